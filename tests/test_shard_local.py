"""Sharding on local paths: every source kind, resize/copy rules, splits, determinism, bad input,
DEST checks, verify and index. Small images, seconds in all."""

from __future__ import annotations

import csv
import json
import tarfile
import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from data_shards import storage
from data_shards.manifest import read_manifest
from data_shards.shard import ShardOptions, run_shard
from pipeline.cli import main
from pipeline.config import ConfigError
from tests.helpers import fashion_arrays
from tests.shard_data import foreign_tars, idx_files, image_folder, jpeg, read_split


def shas(manifest) -> dict:
    return {split: [s.sha256 for s in shards] for split, shards in manifest.splits.items()}


def rejected(dest) -> list[dict]:
    return [json.loads(line) for line in (dest / "rejected.jsonl").read_text().splitlines()]


def test_folder_labels_copy_and_bad_input(tmp_path):
    src = image_folder(tmp_path / "src")
    (src / "cat" / "truncated.jpg").write_bytes((src / "cat" / "001.jpg").read_bytes()[:300])
    (src / "dog" / "empty.jpg").write_bytes(b"")
    (src / "dog" / "readme.txt").write_text("not an image")
    (src / "fish" / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    dest = tmp_path / "out"
    manifest = run_shard(str(src), str(dest), ShardOptions(shard_samples=5, workers=1))

    assert manifest.classes == ["cat", "dog", "fish"]
    assert manifest.num_samples("train") == 18 and list(manifest.splits) == ["train"]
    assert all(s.samples <= 5 for s in manifest.shards("train"))
    reasons = {r["source"].rsplit("/", 2)[-2] + "/" + r["source"].rsplit("/", 1)[-1]: r["reason"]
               for r in rejected(dest)}
    assert set(reasons) == {"cat/truncated.jpg", "dog/empty.jpg", "dog/readme.txt", "fish/fake.png"}
    assert "corrupt" in reasons["cat/truncated.jpg"] and "unsupported" in reasons["dog/readme.txt"]

    samples = read_split(read_manifest(str(dest)), "train")
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert len(by_source) == 18
    for path, sample in by_source.items():
        label = manifest.classes.index(path.rsplit("/", 2)[-2])
        assert sample["cls"] == str(label).encode()
        if path.endswith(".jpg"):  # within bounds and JPEG: copied byte for byte
            assert sample["jpg"] == open(path, "rb").read()
        else:  # PNG source -> JPEG, same size
            assert simplejpeg.decode_jpeg(sample["jpg"]).shape == (48, 64, 3)
    # shuffled globally: the first shard is not the first class in order
    assert len({s["cls"] for s in samples[:5]}) > 1


def test_resize_longer_and_shorter_side(tmp_path):
    src = image_folder(tmp_path / "src", per_class=2, classes=("a",))
    for side, expect in (("longer", (24, 32)), ("shorter", (32, 43))):
        dest = tmp_path / side
        manifest = run_shard(str(src), str(dest), ShardOptions(max_side=32, resize_side=side, quality=80, workers=1))
        for sample in read_split(manifest, "train"):
            assert simplejpeg.decode_jpeg(sample["jpg"]).shape[:2] == expect


def test_executor_workers_give_same_bytes_and_val_fraction(tmp_path):
    src = image_folder(tmp_path / "src", per_class=8)
    opts = dict(shard_samples=4, val_fraction=0.25, seed=3, max_side=40)
    one = run_shard(str(src), str(tmp_path / "w1"), ShardOptions(workers=1, **opts))
    two = run_shard(str(src), str(tmp_path / "w2"), ShardOptions(workers=2, **opts))
    assert shas(one) == shas(two)
    assert one.num_samples("val") == 6 and one.num_samples("train") == 18
    other_seed = run_shard(str(src), str(tmp_path / "s4"), ShardOptions(workers=1, **{**opts, "seed": 4}))
    assert shas(other_seed) != shas(one)
    keys_train = {s["__key__"] for s in read_split(one, "train")}
    assert len(keys_train) == 18


def test_shard_bytes_bound(tmp_path):
    src = image_folder(tmp_path / "src", per_class=6)
    sizes = [p.stat().st_size for p in src.rglob("*.*")]
    bound = max(sizes) * 2
    manifest = run_shard(str(src), str(tmp_path / "out"), ShardOptions(shard_bytes=bound, workers=1))
    assert manifest.num_samples("train") == 18 and len(manifest.shards("train")) >= -(-sum(sizes) // bound) > 1
    samples = read_split(manifest, "train")
    start = 0
    for shard in manifest.shards("train"):
        sources = [json.loads(s["json"])["source"] for s in samples[start:start + shard.samples]]
        start += shard.samples
        assert sum(open(p, "rb").seek(0, 2) for p in sources) <= bound


def test_file_lists_csv_and_jsonl(tmp_path):
    src = image_folder(tmp_path / "imgs", per_class=3)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in files:
            w.writerow([str(p.relative_to(tmp_path)), p.parent.name])
    with open(tmp_path / "list.jsonl", "w") as f:
        for i, p in enumerate(files):
            f.write(json.dumps({"url": str(p), "label": i % 2, "split": "val" if i < 3 else "train"}) + "\n")
    m_csv = run_shard(str(tmp_path / "list.csv"), str(tmp_path / "o1"), ShardOptions(workers=1))
    assert m_csv.classes == ["cat", "dog", "fish"] and m_csv.num_samples("train") == 9
    for s in read_split(m_csv, "train"):
        path = json.loads(s["json"])["source"]
        assert m_csv.classes[int(s["cls"])] == path.rsplit("/", 2)[-2]
    m_jsonl = run_shard(str(tmp_path / "list.jsonl"), str(tmp_path / "o2"), ShardOptions(workers=1))
    assert m_jsonl.classes == ["0", "1"]
    assert m_jsonl.num_samples("val") == 3 and m_jsonl.num_samples("train") == 6


def test_idx_lossless_with_own_splits(tmp_path):
    src = idx_files(tmp_path / "fashion-mnist")
    manifest = run_shard(str(src), str(tmp_path / "out"), ShardOptions(shard_samples=16, workers=2))
    assert manifest.num_samples("train") == 40 and manifest.num_samples("val") == 12
    assert manifest.classes[0] == "T-shirt/top" and manifest.options["lossless"] is True
    images, labels = fashion_arrays("test", 12)
    want = {(images[i].tobytes(), int(labels[i])) for i in range(12)}
    got = {(np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes(), int(s["cls"])) for s in read_split(manifest, "val")}
    assert got == want  # PNG keeps every 28x28 gray pixel


def test_reshard_tars_and_refuse_unsafe_members(tmp_path):
    src = image_folder(tmp_path / "src", per_class=4)
    first = run_shard(str(src), str(tmp_path / "a"), ShardOptions(shard_samples=5, val_fraction=0.25, workers=1))
    again = run_shard(str(tmp_path / "a"), str(tmp_path / "b"), ShardOptions(shard_samples=3, seed=9, workers=1))
    assert again.classes == first.classes
    for split in ("train", "val"):
        before = sorted(s["jpg"] for s in read_split(first, split))
        after = read_split(again, split)
        assert sorted(s["jpg"] for s in after) == before  # JPEGs copied through unchanged
        assert sorted(int(s["cls"]) for s in after) == sorted(int(s["cls"]) for s in read_split(first, split))

    foreign = foreign_tars(tmp_path / "foreign")
    m = run_shard(str(tmp_path / "foreign"), str(tmp_path / "c"), ShardOptions(workers=1))
    assert m.num_samples("train") == 10 and m.classes == ["0", "1", "2"]
    assert sorted(int(s["cls"]) for s in read_split(m, "train")) == sorted(n % 3 for n in range(10))
    assert foreign

    evil = tmp_path / "evil"
    evil.mkdir()
    with tarfile.open(evil / "x.tar", "w") as tar:
        data = jpeg(np.zeros((8, 8, 3), np.uint8))
        info = tarfile.TarInfo("../../etc/x.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ConfigError, match=r"'\.\.'"):
        run_shard(str(evil), str(tmp_path / "d"), ShardOptions(workers=1))
    assert not (tmp_path / "d" / "train").exists()


def test_clear_errors_before_any_work(tmp_path, capsys):
    src = image_folder(tmp_path / "src", per_class=2)
    assert main(["shard", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["shard", str(src), str(tmp_path / "file" / "dest")]) == 2
    assert "not writable" in capsys.readouterr().err
    assert main(["shard", str(src), str(tmp_path / "o"), "--no-progress"]) == 0
    assert main(["shard", str(src), str(tmp_path / "o"), "--max-side", "16"]) == 2
    assert "different dataset" in capsys.readouterr().err
    # the same run again finds its own finished dataset and does nothing
    assert main(["shard", str(src), str(tmp_path / "o"), "--no-progress"]) == 0
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "other.bin").write_text("x")
    assert main(["shard", str(src), str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["shard", str(src), str(tmp_path / "q"), "--quality", "0"]) == 2


def test_verify_catches_flipped_byte_truncation_and_bad_image(tmp_path, capsys):
    src = image_folder(tmp_path / "src", per_class=4)
    dest = tmp_path / "out"
    run_shard(str(src), str(dest), ShardOptions(shard_samples=4, workers=1))
    assert main(["shard", "verify", str(dest), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "12 samples" in out and "OK" in out

    shards = sorted((dest / "train").glob("*.tar"))
    data = bytearray(shards[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    shards[0].write_bytes(bytes(data))
    shards[1].write_bytes(shards[1].read_bytes()[:1500])
    assert main(["shard", "verify", str(dest)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL train/{shards[0].name}: sha256" in out
    assert f"FAIL train/{shards[1].name}: size 1500" in out
    assert f"train/{shards[2].name}" not in out
    assert main(["shard", "verify", str(tmp_path / "nowhere")]) == 2


def test_verify_decode_finds_corrupt_image_with_good_checksum(tmp_path, capsys):
    from data_shards.manifest import Manifest, write_manifest
    from data_shards.writer import write_shard

    good = jpeg(np.full((16, 16, 3), 100, np.uint8))
    info = write_shard(str(tmp_path), "train/train-000000.tar",
                       [{"__key__": "a", "jpg": good}, {"__key__": "b", "jpg": good[: len(good) // 2]}])
    write_manifest(str(tmp_path), Manifest({"train": [info]}))
    assert main(["shard", "verify", str(tmp_path)]) == 0
    assert main(["shard", "verify", str(tmp_path), "--decode"]) == 1
    assert "sample b" in capsys.readouterr().out


def test_index_foreign_shards(tmp_path, capsys):
    paths = foreign_tars(tmp_path / "web" / "train", shards=3, per_shard=4)
    before = [p.read_bytes() for p in paths]
    assert main(["shard", "index", str(tmp_path / "web"), "--out", str(tmp_path / "web")]) == 0
    manifest = read_manifest(str(tmp_path / "web"))
    assert [p.read_bytes() for p in paths] == before  # indexing leaves the shards alone
    assert manifest.num_samples("train") == 12 and manifest.classes == ["0", "1", "2"]
    assert all((tmp_path / "web" / s.index).exists() for s in manifest.shards("train"))
    # range reads through the .idx sidecar give the samples another tool wrote
    from pipeline.data.shards import ShardReader

    reader = ShardReader(manifest)
    middle = reader.read("train", 1, 1, 3)
    assert [s["__key__"] for s in middle] == ["img/00005", "img/00006"]
    assert reader.stats.bytes < paths[1].stat().st_size
    assert main(["shard", "verify", str(tmp_path / "web"), "--decode"]) == 0
    # indexed elsewhere: full paths in the manifest
    assert main(["shard", "index", str(paths[0]), "--out", str(tmp_path / "elsewhere")]) == 0
    other = read_manifest(str(tmp_path / "elsewhere"))
    assert other.shard_url(other.shards("train")[0]) == str(paths[0])
    assert len(read_split(other, "train")) == 4
    assert storage.exists(str(paths[0]) + ".idx")
