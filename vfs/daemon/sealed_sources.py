"""Where a daemon's encrypted templates came from, kept so a restart needs no network.

``STATE/sealed/`` holds, for every template a VEE was started on from a signed ref, that signed
ref and its index exactly as fetched (both encrypted: nothing here is plaintext or a key), and
``sources.json`` maps the template digest to them and to the repository URL::

    {"format": "vfs-sealed-sources", "version": 1,
     "sources": {"<digest>": {"url": "https://...", "ref": "web",
                              "signed_ref": "<id>", "index": "<id>"}}}

On start the daemon reopens each with its identity (signature, trust, header MAC: checked again;
the replay pin is not — the VEE chose this version when it was added). Files are written with
:func:`vfs.durable.write_atomic` before the VEE is registered (save-then-apply): a crash leaves
at most a source no VEE uses, which the next start prunes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from vfs.durable import write_atomic
from vfs.errors import FormatError, InvalidObjectId
from vfs.redirect.objectid import check_object_id
from vfs.redirect.repometa import is_ref_name, load_json
from vfs.redirect.sealed_refs import OpenedRef

log = logging.getLogger(__name__)

FORMAT = "vfs-sealed-sources"


class SealedSources:
    def __init__(self, state: str | os.PathLike[str]) -> None:
        self.dir = Path(state) / "sealed"
        self.file = self.dir / "sources.json"

    def load(self) -> dict[str, dict[str, str]]:
        try:
            raw = self.file.read_bytes()
        except FileNotFoundError:
            return {}
        doc = load_json(raw, str(self.file), 64 << 20)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise FormatError(f"{self.file}: not a sealed sources file")
        sources = doc.get("sources")
        if not isinstance(sources, dict):
            raise FormatError(f"{self.file}: malformed")
        for digest, v in sources.items():
            if (
                not isinstance(v, dict)
                or {"url", "ref", "signed_ref", "index"} - set(v)
                or not all(isinstance(v[k], str) for k in ("url", "ref", "signed_ref", "index"))
                or not is_ref_name(v["ref"])
            ):
                raise FormatError(f"{self.file}: malformed source {digest[:80]!r}")
            try:
                for oid in (digest, v["signed_ref"], v["index"]):
                    check_object_id(oid)
            except InvalidObjectId:
                raise FormatError(f"{self.file}: malformed source {digest[:80]!r}") from None
        return sources

    def _save(self, sources: dict[str, dict[str, str]]) -> None:
        doc = {"format": FORMAT, "version": 1, "sources": sources}
        write_atomic(self.file, json.dumps(doc, indent=1, sort_keys=True).encode(), mode=0o600)

    def remember(self, url: str, opened: OpenedRef) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / f"{opened.ref_id}.ref", opened.raw, mode=0o600)
        index_id = opened.signed.index_id
        write_atomic(self.dir / f"{index_id}.index", opened.raw_index, mode=0o600)
        sources = self.load()
        sources[opened.digest] = {
            "url": url,
            "ref": opened.name,
            "signed_ref": opened.ref_id,
            "index": index_id,
        }
        self._save(sources)

    def read(self, ref_id: str, index_id: str) -> tuple[bytes, bytes]:
        return (
            (self.dir / f"{check_object_id(ref_id)}.ref").read_bytes(),
            (self.dir / f"{check_object_id(index_id)}.index").read_bytes(),
        )

    def prune(self, keep: set[str]) -> None:
        """Forget the sources of templates no VEE uses (and their files)."""
        sources = self.load()
        kept = {d: v for d, v in sources.items() if d in keep}
        if kept == sources:
            return
        self._save(kept)
        used = {v["signed_ref"] + ".ref" for v in kept.values()}
        used |= {v["index"] + ".index" for v in kept.values()}
        for p in self.dir.iterdir():
            if p.suffix in (".ref", ".index") and p.name not in used:
                p.unlink(missing_ok=True)
