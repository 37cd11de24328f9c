"""Several cache blobs corrupted on disk (same size, wrong bytes: a bad sector, a bad copy) are all recomputed in
one rerun, which makes the set the uncorrupted cache made; a blob that is corrupt again after being recomputed
stops the run (the disk is at fault)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from tests.conftest import read_manifest

RUN = ["distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "4", "--ipc", "2",
       "--no-finetune"]


def _flip(blob: Path) -> None:
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x01  # in the tensor data at the end: same size, still parseable, checksum wrong
    blob.write_bytes(bytes(data))


def _images(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "train").rglob("*.png"))}


def test_every_corrupt_blob_is_recomputed_in_one_rerun(vlcp, tmp_path, cache_dir):
    assert vlcp(*RUN, "--out", tmp_path / "a").exit_code == 0
    blobs = [b for stage in ("latents", "synthesis") for b in sorted((Path(cache_dir) / "blobs" / stage).rglob("*"))
             if b.is_file()]
    assert len(blobs) >= 8  # 8 latents, 4 images
    for b in blobs:
        _flip(b)
    r = vlcp(*RUN, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert _images(tmp_path / "b") == _images(tmp_path / "a")
    m = read_manifest(tmp_path / "b")
    synthesis = [b for b in blobs if b.parts[-3] == "synthesis"]
    assert len(synthesis) == 4  # (the latents are not read: every stage after them is cached)
    assert m["cache_corrupt_entries_recomputed"] == 4  # each found and recomputed in this one invocation


def test_an_entry_corrupt_again_after_recomputing_blames_the_disk_and_many_say_clear(vlcp, tmp_path, cache_dir,
                                                                                     monkeypatch):
    from vlcp.pipeline import loop
    from vlcp.store.cache import StageCache

    assert vlcp(*RUN, "--out", tmp_path / "a").exit_code == 0
    synthesis = sorted(b for b in (Path(cache_dir) / "blobs" / "synthesis").rglob("*") if b.is_file())
    for b in synthesis:
        _flip(b)
    monkeypatch.setattr(loop, "MAX_RESTARTS", 2)
    r = vlcp(*RUN, "--out", tmp_path / "b")
    assert r.exit_code == 1 and "Traceback" not in r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("Error: 2 corrupt cache entries found and recomputed, and more remain (cache entry "
                           "synthesis/") and line.endswith("the cache is damaged; `vlcp cache clear --stage synthesis` "
                                                           "(or the whole cache) recomputes them in one run")
    monkeypatch.setattr(loop, "MAX_RESTARTS", 100)
    real = StageCache._read_blob

    def bad_disk(self, stage, key, name, sha):  # every synthesis blob read back wrong, however often rewritten
        if stage == "synthesis":
            self._drop(stage, key, None, "checksum mismatch", blob=name)
            from vlcp.store.cache import CorruptEntry
            raise CorruptEntry("checksum mismatch", stage, key)
        return real(self, stage, key, name, sha)

    monkeypatch.setattr(StageCache, "_read_blob", bad_disk)
    r = vlcp(*RUN, "--out", tmp_path / "c")
    assert r.exit_code == 1
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("Error: cache entry synthesis/") and line.endswith(
        "is corrupt again right after it was recomputed (checksum mismatch): the disk or another process writing "
        "this cache is at fault, not the entry")
