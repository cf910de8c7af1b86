"""The manifest codec: round trips, every refusal rule with a hand-crafted manifest, canonical
identity (one byte string per tree), fuzzing."""

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
from vfs.tree.manifest_build import Node, build_tables, canonical_extents
from vfs.tree.template import Template

OID = bytes(range(32))
Z = bytes(32)


# -- crafting raw manifests ---------------------------------------------------------------------


def ino(kind="dir", *, flags=0, tlen=0, mode=None, uid=0, gid=0, nlink=None, size=0, rdev=0,
        oid=Z, times=(2, 0)):  # fmt: skip
    ifmt = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "lnk": stat.S_IFLNK, "fifo": stat.S_IFIFO}
    code = L.KIND_CODES.get(kind, kind) if isinstance(kind, str) else kind
    if mode is None:
        mode = ifmt.get(kind, stat.S_IFREG) | 0o755
    if nlink is None:
        nlink = 2 if kind == "dir" else 1
    return (code, flags, tlen, mode, uid, gid, nlink, size, rdev, *times, oid)


def raw(inodes, dirents=(), xattrs=(), heap=b"", *, extents=(), version=2, incompat=None,
        counts=None, heap_len=None, rsv=(0, bytes(24)), extra_header=b"") -> bytes:  # fmt: skip
    body = b"".join(L.INODE.pack(*i) for i in inodes)
    body += b"".join(L.DIRENT.pack(*d) for d in dirents)
    body += b"".join(L.XATTR.pack(*x) for x in xattrs)
    body += b"".join(L.EXTENT.pack(*x) for x in extents)
    body += heap
    if incompat is None:
        incompat = L.INCOMPAT_SPARSE if any(i[1] & L.FLAG_SPARSE for i in inodes) else 0
    n = counts or (len(inodes), len(dirents), len(xattrs), len(extents))
    header = L.HEADER.pack(
        L.MAGIC, version, rsv[0], incompat, *n, len(heap) if heap_len is None else heap_len, rsv[1]
    )
    return header + extra_header + body


def one_file(name=b"a", **kw) -> bytes:
    """Root with one regular file ``name`` (empty unless told)."""
    extents = kw.pop("extents", ())
    return raw([ino("dir"), ino("reg", **kw)], [(1, 2, len(name), 0)], heap=name, extents=extents)


def sparse_file(extents, size=1000, flags=L.FLAG_HAS_OID | L.FLAG_SPARSE, **kw) -> bytes:
    recs = [(2, 0, off, n) for off, n in extents]
    return one_file(size=size, flags=flags, oid=OID, extents=recs, **kw)


def refused(data: bytes, match: str, exc=FormatError) -> None:
    with pytest.raises(exc, match=match) as info:
        manifest.decode(data)
    assert "\n" not in str(info.value)


# -- valid manifests ----------------------------------------------------------------------------


def test_crafted_minimal_manifest_is_accepted():
    entries, dirents = manifest.decode(one_file())
    assert [e.kind for e in entries] == ["dir", "reg"]
    assert dirents == [(1, b"a", 2)]
    assert entries[1].oid is None and entries[1].nlink == 1 and entries[1].extents is None
    assert manifest.decode(raw([ino("dir")]))[0][0].nlink == 2  # an empty tree
    assert len(raw([ino("dir")])) == L.HEADER_LEN + L.INODE.size == 64 + 84


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
    root.children[b"d1"] = Node("dir", 0o1777, mtime_ns=-(10**18))
    hole = Node("reg", 0o644, size=10 << 20, oid=hashlib.sha256(b"h").hexdigest())
    hole.extents = [(4096, 4096), (8 << 20, 100)]
    root.children[b"sparse"] = hole
    root.children[b"all-hole"] = Node("reg", 0o644, size=1 << 20, oid=OID.hex(), extents=[])
    return root


def test_encode_decode_round_trip():
    entries, dirents = build_tables(_sample_tree())
    data = manifest.encode(entries, dirents)
    assert manifest.decode(data) == (entries, dirents)
    by_path = dict(Template.from_bytes(data).walk())
    assert by_path[b"hard"] is by_path[b"etc/passwd"]
    assert by_path[b"hard"].nlink == 2 and by_path[b""].nlink == 4  # root: etc, d1 subdirs
    assert by_path[b"link"].size == len(b"../etc/passwd")
    sp = by_path[b"sparse"]
    assert sp.extents == ((4096, 4096), (8 << 20, 100)) and sp.blocks == 8 + 1
    assert by_path[b"all-hole"].extents == () and by_path[b"all-hole"].blocks == 0
    assert by_path[b"etc/passwd"].extents is None and by_path[b"etc/passwd"].blocks == 1
    assert by_path[b"etc/passwd"].data_extents == ((0, 3),)
    assert data[12] & L.INCOMPAT_SPARSE  # the feature bit: set because a file is sparse


def test_no_atime_in_a_template():
    """A template keeps no atime: entries show their mtime, and nothing a source's atime could
    be changes the manifest (the field does not exist)."""
    entries, _ = build_tables(_sample_tree())
    assert all(e.atime_ns == e.mtime_ns for e in entries)
    assert "atime_ns" not in Node.__slots__
    assert L.INODE.size == 84  # kind..oid without an atime


def test_feature_bit_only_when_used():
    root = _sample_tree()
    del root.children[b"sparse"], root.children[b"all-hole"]
    data = manifest.encode(*build_tables(root))
    assert int.from_bytes(data[12:16], "little") == 0


def test_canonical_form_gives_one_digest_per_tree():
    a = manifest.encode(*build_tables(_sample_tree()))
    b = manifest.encode(*build_tables(_sample_tree()))
    assert a == b
    t = _sample_tree()
    t.children[b"fifo"].mtime_ns += 1
    assert manifest.encode(*build_tables(t)) != a
    t = _sample_tree()  # the same allocation given another way: the same manifest
    t.children[b"sparse"].extents = [(8 << 20, 50), (4096, 2048), (8 << 20, 100), (6144, 2048)]
    assert manifest.encode(*build_tables(t)) == a


def test_canonical_extents():
    assert canonical_extents(None, 10) is None
    assert canonical_extents([(0, 10)], 10) is None  # the whole file: not sparse
    assert canonical_extents([(0, 4), (4, 6)], 10) is None  # touching extents merge
    assert canonical_extents([(0, 40)], 10) is None  # clipped to the file
    assert canonical_extents([], 10) == ()
    assert canonical_extents([(5, 0), (2, 2), (20, 5)], 10) == ((2, 2),)
    assert canonical_extents([(6, 2), (0, 3), (2, 2)], 10) == ((0, 4), (6, 2))


# -- one tree, one byte string: non-canonical encodings are refused -----------------------------


def _compressed(data: bytes, **kw) -> bytes:
    body = zstandard.ZstdCompressor(**kw).compress(data[64:])
    return data[:64] + body


def test_three_non_canonical_encodings_of_one_tree_are_refused():
    """What version 1 accepted as the same tree under three digests: a longer header, a zstd
    body, another zstd frame of it. Only the canonical bytes are a manifest now."""
    root = _sample_tree()
    del root.children[b"sparse"], root.children[b"all-hole"]
    good = manifest.encode(*build_tables(root))
    grown = good[:64] + bytes(8) + good[64:]  # "header_len 72, extra bytes ignored"
    zstd_a = _compressed(good, level=3)
    zstd_b = _compressed(good, level=19, write_checksum=True)
    digests = {hashlib.sha256(x).hexdigest() for x in (good, grown, zstd_a, zstd_b)}
    assert len(digests) == 4
    manifest.decode(good)
    for other in (grown, zstd_a, zstd_b):
        refused(other, "bytes after the header")
        with pytest.raises(FormatError):
            Template.from_bytes(other, hashlib.sha256(other).hexdigest())


def test_other_non_canonical_encodings_are_refused():
    refused(raw([ino("dir")], incompat=L.INCOMPAT_SPARSE), "no file is sparse")
    refused(raw([ino("dir")], rsv=(1, bytes(24))), "reserved")
    refused(raw([ino("dir")], rsv=(0, b"\x01" + bytes(23))), "reserved")
    refused(one_file(size=0, oid=OID), "content reference")  # stray oid bytes
    refused(raw([ino("dir")], heap=b"junk"), "unused bytes")


def test_version_and_feature_errors_name_them():
    refused(raw([ino("dir")], version=3), "version 3 is newer", UnsupportedFeature)
    refused(raw([ino("dir")], version=1), "version 1 .*publish the template again",
            UnsupportedFeature)  # fmt: skip
    refused(raw([ino("dir")], incompat=1 << 5), r"unknown incompatible feature bits 0x20 \(bit 5\)",
            UnsupportedFeature)  # fmt: skip
    refused(raw([ino("dir")], incompat=(1 << 31) | 1), "bit 31", UnsupportedFeature)
    refused(raw([ino("dir")], version=0), "unknown version 0")


def test_a_version_1_manifest_is_refused_in_one_line():
    # the 64-byte v1 header of an empty tree, as version 1 wrote it (uncompressed body)
    v1 = L.MAGIC + bytes.fromhex("01004000") + bytes(4) + bytes(4) + (1).to_bytes(4, "little")
    v1 = v1 + bytes(64 - len(v1)) + bytes(92)
    refused(v1, "version 1", UnsupportedFeature)


# -- sparse files -------------------------------------------------------------------------------


def test_sparse_rules():
    e = manifest.decode(sparse_file([(0, 10), (512, 488)]))[0][1]
    assert e.extents == ((0, 10), (512, 488)) and e.blocks == 1 + 1
    assert manifest.decode(sparse_file([]))[0][1].extents == ()
    refused(sparse_file([(0, 1000)]), "no hole")
    refused(sparse_file([(0, 10), (10, 5)]), "touches")
    refused(sparse_file([(100, 10), (0, 5)]), "precedes")
    refused(sparse_file([(0, 10), (5, 10)]), "overlaps")
    refused(sparse_file([(0, 0)]), "empty")
    refused(sparse_file([(990, 11)]), "outside the file")
    refused(sparse_file([(0, 10)], flags=L.FLAG_HAS_OID), "without the sparse")
    plain_and_sparse = [ino("dir"), ino("reg", size=9, flags=1, oid=OID),
                        ino("reg", size=9, flags=3, oid=OID)]  # fmt: skip
    refused(raw(plain_and_sparse, [(1, 2, 1, 0), (1, 3, 1, 0)], heap=b"ab",
                extents=[(2, 0, 0, 1)]), "not a sparse file")  # fmt: skip
    refused(sparse_file([])[:12] + bytes(4) + sparse_file([])[16:], "without the sparse")
    empty_sparse = one_file(size=0, flags=L.FLAG_SPARSE)
    refused(empty_sparse, "cannot be sparse")
    data = sparse_file([(0, 10)])
    refused(data[:-21] + (7).to_bytes(4, "little") + data[-17:], "reserved extent")
    two = raw([ino("dir"), ino("reg", size=9, flags=3, oid=OID), ino("reg", size=9, flags=3,
               oid=OID)], [(1, 2, 1, 0), (1, 3, 1, 0)], heap=b"ab",
              extents=[(3, 0, 0, 1), (2, 0, 0, 1)])  # fmt: skip
    refused(two, "extents out of order")


def test_extents_count_limits():
    refused(raw([ino("dir")], counts=(1, 0, 0, L.MAX_EXTENTS + 1)), "absurd extent count")
    refused(raw([ino("dir")], counts=(1, 0, 0, 5)), "without the sparse-files")


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
            if draw(st.booleans()):  # sparse: any data ranges, canonicalised by build_tables
                ranges = st.tuples(st.integers(0, size + 9), st.integers(0, 2**20))
                child.extents = draw(st.lists(ranges, max_size=4))
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
    assert manifest.encode(*manifest.decode(data)) == data
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
    refused(raw([ino("dir")], (), [(1, 6, 3, 0)], b"user.a"), "reserved")


def test_bad_magic_and_short_input():
    refused(b"", "bad magic")
    refused(L.MAGIC + bytes(20), "shorter than the header")
    refused(b"GIF89a" + bytes(100), "bad magic")


def test_absurd_counts_refused_without_allocating():
    t0 = time.perf_counter()
    refused(raw([ino("dir")], counts=(2**25, 0, 0, 0)), "absurd counts")
    refused(raw([ino("dir")], counts=(2**24, 2**24, 2**24, 0)), "bytes after the header")
    refused(raw([ino("dir")], heap_len=2**40), "bytes after the header")
    assert time.perf_counter() - t0 < 0.5


def test_length_must_match_the_tables():
    good = raw([ino("dir"), ino("reg")], [(1, 2, 1, 0)], heap=b"a")
    refused(good[:-1], "bytes after the header")
    refused(good + b"x", "bytes after the header")
    refused(raw([ino("dir")], heap_len=3), "bytes after the header")
    refused(raw([ino("dir")], counts=(2, 0, 0, 0)), "bytes after the header")


def test_digest_mismatch_is_an_integrity_error():
    data = manifest.encode(*build_tables(_sample_tree()))
    good = hashlib.sha256(data).hexdigest()
    assert Template.from_bytes(data, good).digest == good
    with pytest.raises(IntegrityError, match="refusing"):
        Template.from_bytes(data, "0" * 64)


# -- fuzzing: only FormatError, never a hang; what is accepted is canonical ---------------------

_VALID = manifest.encode(*build_tables(_sample_tree()))


def _decode_or_format_error(data: bytes) -> None:
    """Decode ``data``: either a one-line FormatError, or a tree whose canonical encoding is
    exactly ``data`` (checked twice: by decode itself, and by the structural checks alone, so
    a gap in them is found here and not left to the final re-encoding)."""
    t0 = time.perf_counter()
    try:
        entries, dirents = manifest.decode(data)
    except FormatError as e:
        assert "\n" not in str(e)
    else:
        assert manifest.encode(entries, dirents) == data
        assert manifest._encode(*manifest._parse(data)) == data
    assert time.perf_counter() - t0 < 1.0


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_fuzz_random_bytes(data):
    _decode_or_format_error(data)
    _decode_or_format_error(L.MAGIC + data)


@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 10_000),
)
@settings(max_examples=500, deadline=None)
def test_fuzz_mutated_manifests(edits, cut):
    data = bytearray(_VALID)
    for pos, val in edits:
        data[pos % len(data)] = val
    _decode_or_format_error(bytes(data))
    _decode_or_format_error(bytes(data[: cut % len(data)]))


@given(st.integers(0, len(_VALID) - 1), st.binary(min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_fuzz_insertions(pos, junk):
    _decode_or_format_error(_VALID[:pos] + junk + _VALID[pos:])


@given(trees(), st.data())
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_fuzz_mutated_random_trees_accept_only_canonical_bytes(root, data):
    """Mutate a few bytes of random trees' manifests, mostly in the tables (modes, sizes,
    flags, counts, extents): whatever still decodes must be the canonical encoding of it."""
    good = bytearray(manifest.encode(*build_tables(root)))
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(good) - 1))
        good[pos] = data.draw(st.sampled_from([0, 1, 2, 3, 0x80, 0xFF, good[pos] ^ 1]))
    _decode_or_format_error(bytes(good))


def test_overlay_marker_xattrs_are_refused():
    """trusted.overlay.* are markers in a private layer and in the kernel engine's images: a
    hostile manifest carrying one (an opaque or redirect marker) is refused at load."""
    for name in (b"trusted.overlay.opaque", b"trusted.overlay.redirect", b"trusted.overlay.x"):
        root = Node("dir", 0o755)
        d = Node("dir", 0o755)
        d.xattrs = {name: b"y"}
        root.children[b"etc"] = d
        with pytest.raises(FormatError, match="reserved xattr"):
            manifest.decode(manifest._encode(*build_tables(root)))  # unchecked encoder
