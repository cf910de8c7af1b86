"""The manifest codec: round trips, every refusal rule with a hand-crafted manifest, fuzzing."""

from __future__ import annotations

import hashlib
import stat
import time

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfs.errors import FormatError, IntegrityError, UnsupportedFeature
from vfs.tree import manifest
from vfs.tree import manifest_layout as L
from vfs.tree.manifest_build import Node, build_tables
from vfs.tree.template import Template

OID = bytes(range(32))
Z = bytes(32)


# -- crafting raw manifests ---------------------------------------------------------------------


def ino(kind="dir", *, flags=0, tlen=0, mode=None, uid=0, gid=0, nlink=None, size=0, rdev=0,
        oid=Z, times=(1, 2, 3)):  # fmt: skip
    ifmt = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "lnk": stat.S_IFLNK, "fifo": stat.S_IFIFO}
    code = L.KIND_CODES.get(kind, kind) if isinstance(kind, str) else kind
    if mode is None:
        mode = ifmt.get(kind, stat.S_IFREG) | 0o755
    if nlink is None:
        nlink = 2 if kind == "dir" else 1
    return (code, flags, tlen, mode, uid, gid, nlink, size, rdev, *times, oid)


def raw(inodes, dirents=(), xattrs=(), heap=b"", *, version=1, incompat=0, compat=0,
        header_len=64, counts=None, body_len=None, stored_len=None, rsv=(0, 0),
        compress=False, extra_header=b"") -> bytes:  # fmt: skip
    body = b"".join(L.INODE.pack(*i) for i in inodes)
    body += b"".join(L.DIRENT.pack(*d) for d in dirents)
    body += b"".join(L.XATTR.pack(*x) for x in xattrs)
    body += heap
    stored = zstandard.ZstdCompressor().compress(body) if compress else body
    if compress:
        incompat |= L.INCOMPAT_ZSTD
    n = counts or (len(inodes), len(dirents), len(xattrs))
    header = L.HEADER.pack(
        L.MAGIC, version, header_len, incompat, compat, *n, rsv[0], len(heap),
        len(body) if body_len is None else body_len,
        len(stored) if stored_len is None else stored_len, rsv[1],
    )  # fmt: skip
    return header + extra_header + stored


def one_file(name=b"a", **kw) -> bytes:
    """Root with one empty regular file ``name``."""
    return raw([ino("dir"), ino("reg", **kw)], [(1, 2, len(name), 0)], heap=name)


def refused(data: bytes, match: str, exc=FormatError) -> None:
    with pytest.raises(exc, match=match) as info:
        manifest.decode(data)
    assert "\n" not in str(info.value)


# -- valid manifests ----------------------------------------------------------------------------


def test_crafted_minimal_manifest_is_accepted():
    entries, dirents = manifest.decode(one_file())
    assert [e.kind for e in entries] == ["dir", "reg"]
    assert dirents == [(1, b"a", 2)]
    assert entries[1].oid is None and entries[1].nlink == 1
    assert manifest.decode(raw([ino("dir")]))[0][0].nlink == 2  # an empty tree


def test_header_can_grow_and_compat_bits_are_ignored():
    data = raw([ino("dir")], header_len=72, extra_header=b"\x01" * 8, compat=0xFFFF)
    assert len(manifest.decode(data)[0]) == 1


def _sample_tree() -> Node:
    root = Node("dir", 0o755, mtime_ns=5)
    etc = Node("dir", 0o755)
    root.children[b"etc"] = etc
    f = Node("reg", 0o4755, uid=7, gid=8, size=3, oid=hashlib.sha256(b"abc").hexdigest())
    f.xattrs = {b"user.b": b"2", b"security.a": b"\x00\xff"}
    etc.children[b"passwd"] = f
    root.children[b"hard"] = f
    root.children[b"link"] = Node("lnk", 0o777, target=b"../etc/passwd")
    root.children[b"null"] = Node("chr", 0o666, rdev=(1 << 8) | 3)
    root.children[b"fifo"] = Node("fifo", 0o644)
    root.children[b"\xff\xfe binary name"] = Node("reg", 0o600)
    root.children[b"d1"] = Node("dir", 0o1777, atime_ns=-(10**18))
    return root


@pytest.mark.parametrize("compress", [True, False])
def test_encode_decode_round_trip(compress):
    entries, dirents = build_tables(_sample_tree())
    data = manifest.encode(entries, dirents, compress=compress)
    assert manifest.decode(data) == (entries, dirents)
    by_path = dict(Template.from_bytes(data).walk())
    assert by_path[b"hard"] is by_path[b"etc/passwd"]
    assert by_path[b"hard"].nlink == 2 and by_path[b""].nlink == 4  # root: etc, d1 subdirs
    assert by_path[b"link"].size == len(b"../etc/passwd")


def test_canonical_form_gives_one_digest_per_tree():
    a = manifest.encode(*build_tables(_sample_tree()))
    b = manifest.encode(*build_tables(_sample_tree()))
    assert a == b
    t = _sample_tree()
    t.children[b"fifo"].mtime_ns += 1
    assert manifest.encode(*build_tables(t)) != a


names = st.binary(min_size=1, max_size=12).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)


@st.composite
def trees(draw, depth=0):
    node = Node("dir", draw(st.integers(0, 0o7777)), uid=draw(st.integers(0, 70000)))
    pool: list[Node] = []
    for name in draw(st.lists(names, max_size=5, unique=True)):
        kind = draw(st.sampled_from(["reg", "reg", "lnk", "fifo", "dir", "hard"]))
        if kind == "dir" and depth < 3:
            child = draw(trees(depth + 1))
        elif kind == "hard" and pool:
            child = draw(st.sampled_from(pool))
        elif kind == "lnk":
            child = Node("lnk", 0o777, target=draw(names))
        elif kind == "fifo":
            child = Node("fifo", 0o600, mtime_ns=draw(st.integers(-(2**63), 2**63 - 1)))
        else:
            size = draw(st.integers(0, 2**40))
            child = Node("reg", 0o644, size=size, oid=hashlib.sha256(name).hexdigest())
            child.xattrs = draw(st.dictionaries(st.sampled_from([b"user.x", b"trusted.y"]),
                                                st.binary(max_size=8)))  # fmt: skip
            pool.append(child)
        node.children[name] = child
    return node


@given(trees())
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_round_trip_of_random_trees(root):
    entries, dirents = build_tables(root)
    data = manifest.encode(entries, dirents)
    assert manifest.decode(data) == (entries, dirents)
    t = Template.from_bytes(data, hashlib.sha256(data).hexdigest())
    for path, e in t.walk():
        assert t.resolve(path) is e
        if e.kind == "dir":
            assert [n for n, _ in t.readdir(e.ino)] == sorted(t.children(e.ino))


# -- hostile manifests: every rule --------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [b"a/b", b"/", b"a\0b", b".", b"..", b"x" * 256], ids=lambda n: repr(n[:8])
)
def test_illegal_names_refused(name):
    refused(one_file(name), "illegal name|length")


def test_empty_name_refused():
    data = raw([ino("dir"), ino("reg")], [(1, 2, 0, 0)])
    refused(data, "name of length 0")


def test_max_length_name_accepted():
    manifest.decode(one_file(b"y" * 255))


def test_too_deep_refused():
    n = L.MAX_DEPTH + 1
    inodes = [ino("dir", nlink=3)] * n + [ino("dir")]
    dirents = [(i, i + 1, 1, 0) for i in range(1, n + 1)]
    refused(raw(inodes, dirents, heap=b"d" * n), "nested deeper")
    ok = raw(inodes[1:], dirents[:-1], heap=b"d" * (n - 1))  # exactly MAX_DEPTH levels
    assert len(manifest.decode(ok)[0]) == n


def test_directory_with_two_names_refused():
    data = raw([ino("dir", nlink=3), ino("dir")], [(1, 2, 1, 0), (1, 2, 1, 0)], heap=b"ab")
    refused(data, "second name")


def test_directory_containing_itself_refused():
    data = raw([ino("dir", nlink=3), ino("dir", nlink=3)], [(1, 2, 1, 0), (2, 2, 1, 0)], heap=b"aa")
    refused(data, "second name")


def test_root_as_a_child_refused():
    data = raw([ino("dir", nlink=3), ino("dir")], [(1, 2, 1, 0), (2, 1, 1, 0)], heap=b"ar")
    refused(data, "second name")


def test_detached_directory_cycle_refused():
    # inodes 2 and 3 contain each other, nothing links them to the root
    inodes = [ino("dir"), ino("dir", nlink=3), ino("dir", nlink=3)]
    refused(raw(inodes, [(2, 3, 1, 0), (3, 2, 1, 0)], heap=b"ba"), "not a reachable directory")
    refused(raw(inodes), "not reachable from the root")


@pytest.mark.parametrize("nlink", [1, 3, 0])
def test_inconsistent_hard_link_group_refused(nlink):
    data = raw([ino("dir"), ino("reg", nlink=nlink)], [(1, 2, 1, 0), (1, 2, 1, 0)], heap=b"ab")
    if nlink == 2:
        manifest.decode(data)
    refused(data, "link count")


def test_consistent_hard_link_group_accepted():
    data = raw([ino("dir"), ino("reg", nlink=2)], [(1, 2, 1, 0), (1, 2, 1, 0)], heap=b"ab")
    entries, dirents = manifest.decode(data)
    assert entries[1].nlink == 2 and [d[2] for d in dirents] == [2, 2]


def test_wrong_directory_link_count_refused():
    refused(raw([ino("dir", nlink=5)]), "link count")


def test_duplicate_and_unsorted_names_refused():
    two = [ino("dir"), ino("reg"), ino("reg")]
    refused(raw(two, [(1, 2, 1, 0), (1, 3, 1, 0)], heap=b"aa"), "out of order or duplicate")
    refused(raw(two, [(1, 2, 1, 0), (1, 3, 1, 0)], heap=b"ba"), "out of order or duplicate")


def test_non_canonical_numbering_refused():
    two = [ino("dir"), ino("reg"), ino("reg")]
    refused(raw(two, [(1, 3, 1, 0), (1, 2, 1, 0)], heap=b"ab"), "out of order or out of range")
    refused(raw(two[:2], [(1, 7, 1, 0)], heap=b"a"), "out of range")


def test_parent_that_is_not_a_directory_refused():
    data = raw([ino("dir"), ino("reg"), ino("reg")], [(1, 2, 1, 0), (2, 3, 1, 0)], heap=b"ab")
    refused(data, "not a reachable directory")


def test_root_must_be_a_directory():
    refused(raw([ino("reg", nlink=0)]), "root")


@pytest.mark.parametrize("kind", [0, 8, 255])
def test_unknown_kind_refused(kind):
    refused(raw([ino("dir"), ino(kind, mode=stat.S_IFREG)], [(1, 2, 1, 0)], heap=b"a"), "kind")


def test_mode_must_fit_kind():
    refused(one_file(mode=stat.S_IFDIR | 0o755), "does not fit kind")
    refused(one_file(mode=stat.S_IFREG | 0o10000), "does not fit kind")


def test_absurd_size_refused():
    refused(one_file(size=2**60, flags=1, oid=OID), "absurd size")


def test_content_reference_rules():
    refused(one_file(size=5), "content reference")  # no oid for a non-empty file
    refused(one_file(size=0, flags=1, oid=OID), "content reference")  # oid on an empty file
    refused(one_file(size=0, oid=OID), "content reference")  # stray oid bytes
    manifest.decode(one_file(size=5, flags=1, oid=OID))


def test_owner_minus_one_refused():
    refused(one_file(uid=0xFFFFFFFF), "owner")


def test_symlink_rules():
    lnk = ino("lnk", tlen=3, size=3, mode=stat.S_IFLNK | 0o777)
    ok = raw([ino("dir"), lnk], [(1, 2, 1, 0)], heap=b"l" + b"a/b")
    assert manifest.decode(ok)[0][1].target == b"a/b"
    refused(raw([ino("dir"), lnk], [(1, 2, 1, 0)], heap=b"l" + b"a\0b"), "NUL")
    bad_size = ino("lnk", tlen=3, size=4, mode=stat.S_IFLNK | 0o777)
    refused(raw([ino("dir"), bad_size], [(1, 2, 1, 0)], heap=b"labc"), "symlink size")
    empty = ino("lnk", tlen=0, mode=stat.S_IFLNK | 0o777)
    refused(raw([ino("dir"), empty], [(1, 2, 1, 0)], heap=b"l"), "target length")


def test_xattr_rules():
    base = [ino("dir")]

    def x(*recs, heap=b""):
        return raw(base, (), recs, heap)

    assert manifest.decode(x((1, 6, 0, 1), heap=b"user.av"))[0][0].xattrs == {b"user.a": b"v"}
    refused(x((1, 7, 0, 0), heap=b"other.a"), "illegal xattr name")
    refused(x((1, 5, 0, 0), heap=b"user\0"), "illegal xattr name")
    refused(x((2, 6, 0, 0), heap=b"user.a"), "out of range")
    refused(x((1, 6, 0, 0), (1, 6, 0, 0), heap=b"user.auser.a"), "out of order or duplicate")
    refused(x((1, 6, 0, L.MAX_XATTR_VALUE + 1), heap=b"user.a"), "length")


def test_heap_must_be_consumed_exactly():
    refused(raw([ino("dir")], heap=b"junk"), "unused bytes")
    data = raw([ino("dir"), ino("reg")], [(1, 2, 5, 0)], heap=b"ab")
    refused(data, "past the heap")


def test_reserved_fields_must_be_zero():
    refused(raw([ino("dir"), ino("reg")], [(1, 2, 1, 7)], heap=b"a"), "reserved")
    refused(raw([ino("dir")], rsv=(1, 0)), "reserved")


def test_bad_magic_and_short_input():
    refused(b"", "bad magic")
    refused(L.MAGIC + bytes(20), "shorter than the header")
    refused(b"GIF89a" + bytes(100), "bad magic")


def test_newer_version_and_unknown_incompat_feature_refused():
    refused(raw([ino("dir")], version=2), "newer", UnsupportedFeature)
    refused(raw([ino("dir")], incompat=1 << 5), "unknown incompatible", UnsupportedFeature)
    refused(raw([ino("dir")], version=0), "unknown version")


def test_absurd_counts_refused_without_allocating():
    t0 = time.perf_counter()
    refused(raw([ino("dir")], counts=(2**25, 0, 0)), "absurd counts")
    refused(raw([ino("dir")], counts=(2**24, 2**24, 2**24)), "body length")
    refused(raw([ino("dir")], body_len=2**40), "body length")
    assert time.perf_counter() - t0 < 0.5


def test_length_fields_must_match_the_data():
    refused(raw([ino("dir")], stored_len=5), "stored body")
    # found by the fuzzer: an uncompressed body shorter than its tables
    short = raw([ino("dir")], heap=b"")[:-10]
    short = short[:52] + (len(short) - 64).to_bytes(8, "little") + short[60:]
    refused(short, "uncompressed body")
    refused(raw([ino("dir")], header_len=10), "header length")
    refused(raw([ino("dir")], header_len=60000), "header length")


def test_compressed_body_that_expands_beyond_its_length_refused():
    # a small frame that decompresses to 64 MiB while the header promises one inode
    body = L.INODE.pack(*ino("dir")) + bytes(64 << 20)
    bomb = zstandard.ZstdCompressor().compress(body)
    header = L.HEADER.pack(
        L.MAGIC, 1, 64, L.INCOMPAT_ZSTD, 0, 1, 0, 0, 0, 0, L.INODE.size, len(bomb), 0
    )
    t0 = time.perf_counter()
    refused(header + bomb, "longer than the header says")
    assert time.perf_counter() - t0 < 1
    whole = raw([ino("dir")], compress=True)
    cut = whole[:52] + (len(whole) - 64 - 3).to_bytes(8, "little") + whole[60:-3]
    refused(cut, "truncated|corrupt")


def test_trailing_data_after_the_compressed_body_refused():
    data = raw([ino("dir")], compress=True)
    junk = data + b"junk"
    junk = junk[:52] + (len(junk) - 64).to_bytes(8, "little") + junk[60:]
    refused(junk, "data after the compressed body")
    frame = zstandard.ZstdCompressor().compress(L.INODE.pack(*ino("dir")))
    two = raw([ino("dir")], compress=True)[:64]
    two = two[:52] + (2 * len(frame)).to_bytes(8, "little") + two[60:] + frame + frame
    refused(two, "data after the compressed body")


def test_corrupt_compressed_body_refused():
    data = bytearray(manifest.encode(*build_tables(_sample_tree())))
    data[-5] ^= 0xFF
    with pytest.raises(FormatError):
        manifest.decode(bytes(data))


def test_digest_mismatch_is_an_integrity_error():
    data = manifest.encode(*build_tables(_sample_tree()))
    good = hashlib.sha256(data).hexdigest()
    assert Template.from_bytes(data, good).digest == good
    with pytest.raises(IntegrityError, match="refusing"):
        Template.from_bytes(data, "0" * 64)


# -- fuzzing: only FormatError, never a hang ----------------------------------------------------

_VALID = manifest.encode(*build_tables(_sample_tree()), compress=False)
_VALID_Z = manifest.encode(*build_tables(_sample_tree()), compress=True)


def _decode_or_format_error(data: bytes) -> None:
    t0 = time.perf_counter()
    try:
        manifest.decode(data)
    except FormatError as e:
        assert "\n" not in str(e)
    assert time.perf_counter() - t0 < 1.0


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_fuzz_random_bytes(data):
    _decode_or_format_error(data)
    _decode_or_format_error(L.MAGIC + data)


@given(
    st.sampled_from([_VALID, _VALID_Z]),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 10_000),
)
@settings(max_examples=400, deadline=None)
def test_fuzz_mutated_manifests(base, edits, cut):
    data = bytearray(base)
    for pos, val in edits:
        data[pos % len(data)] = val
    _decode_or_format_error(bytes(data))
    _decode_or_format_error(bytes(data[: cut % len(data)]))


@given(st.integers(0, len(_VALID) - 1), st.binary(min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_fuzz_insertions(pos, junk):
    _decode_or_format_error(_VALID[:pos] + junk + _VALID[pos:])
