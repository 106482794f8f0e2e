"""Bad input that used to give silently wrong results: link loops and doubly-linked files in a
dataset folder, photos in formats that were skipped, names that broke the text outputs, photos
of mixed aspect ratios, the MSLS radius, and SelaVPR's official order of equal counts."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vprkit.cli import main as cli_main
from vprkit.data.datasets import IMAGE_EXTENSIONS, read_folders, read_images_paths
from vprkit.data.formats import open_dataset
from vprkit.data.images import Preprocess, input_hw, load_image
from vprkit.errors import VprkitError
from vprkit.extract import extract_global_descriptors, same_shape_batches
from vprkit.models.info import ModelInfo
from vprkit.models.outputs import DescriptorOutput
from vprkit.models.registry import model_info, register_model
from vprkit.pipeline import dataset_positives, extract
from vprkit.rerank import descending_order, rerank_by_mnn, rerank_order


class MeanColour(torch.nn.Module):
    """Descriptor = mean colour (each image alone: nothing depends on the batch); local map =
    the image pooled 4x4, so its shape follows the input's."""

    def forward(self, x, local: bool = True):
        local_desc = torch.nn.functional.avg_pool2d(x, 4) if local else None
        return DescriptorOutput(
            torch.nn.functional.normalize(x.mean(dim=(2, 3)), dim=1), local_desc
        )


register_model(
    lambda: MeanColour(), name="_silent_mean_colour", info=ModelInfo(image_size=(28, 28))
)


def _photo(path: Path, colour, size=(40, 32), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), colour, dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _names(paths, folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in paths]


# ---------------------------------------------------------------------------------------
# 1. Folder walks: link loops and files reached twice
# ---------------------------------------------------------------------------------------


class TestFolderLinks:
    def test_loop_walked_once_and_linked_file_counted_once(self, tmp_path, caplog):
        db = tmp_path / "db"
        for i in range(3):
            _photo(db / f"a{i}.jpg", (i, 0, 0))
            _photo(db / "sub" / f"b{i}.jpg", (0, i, 0))
        os.symlink("..", db / "sub" / "loop")  # db/sub/loop/sub/loop/... forever
        os.symlink("../a0.jpg", db / "sub" / "same_as_a0.jpg")
        elsewhere = tmp_path / "elsewhere"
        _photo(elsewhere / "c.jpg", (0, 0, 9))
        os.symlink(elsewhere, db / "linked")  # an ordinary linked folder: followed
        os.symlink(elsewhere, db / "linked_again")
        with caplog.at_level(logging.WARNING, logger="vprkit.data.datasets"):
            paths = read_images_paths(db)
        assert _names(paths, db) == [
            "a0.jpg",
            "a1.jpg",
            "a2.jpg",
            "linked/c.jpg",
            "sub/b0.jpg",
            "sub/b1.jpg",
            "sub/b2.jpg",
        ]
        assert "2 folder link(s) lead to a folder already listed" in caplog.text
        assert "'linked_again', 'sub/loop'" in caplog.text
        assert "1 image(s) are links to a file already listed" in caplog.text
        assert "'sub/same_as_a0.jpg'" in caplog.text

    def test_linked_dataset_folder_and_loop_in_a_dataset(self, tmp_path):
        real = tmp_path / "real"
        for side in ("database", "queries"):
            for i in range(2):
                _photo(real / side / f"{side}{i}.jpg", (i, 0, 0))
            os.symlink(".", real / side / "again")  # a loop onto the folder itself
        os.symlink(real, tmp_path / "link")
        ds = read_folders(
            tmp_path / "link" / "database", tmp_path / "link" / "queries", no_labels=True
        )
        assert ds.num_database == 2 and ds.num_queries == 2
        assert str(ds.database_paths[0]).startswith(str(tmp_path / "link"))  # the user's path


# ---------------------------------------------------------------------------------------
# 2. Image formats
# ---------------------------------------------------------------------------------------


class TestImageFormats:
    FORMATS = {".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF"}

    def test_pillow_formats_read_and_other_files_listed(self, tmp_path, caplog):
        from PIL import features

        assert (".webp" in IMAGE_EXTENSIONS) == features.check("webp")
        folder = tmp_path / "photos"
        _photo(folder / "a.jpg", (200, 10, 10))
        for i, (ext, fmt) in enumerate(self.FORMATS.items()):
            if ext in IMAGE_EXTENSIONS:
                _photo(folder / f"p{i}{ext.upper() if i % 2 else ext}", (10, 200, 10), fmt=fmt)
        for name in ("notes.txt", "x.heic", "y.cr2", "z.json", "w.mp4", "v.svg"):
            (folder / name).write_bytes(b"not read")
        (folder / ".DS_Store").write_bytes(b"hidden: ignored")
        with caplog.at_level(logging.WARNING, logger="vprkit.data.datasets"):
            paths = read_images_paths(folder)
        expected = 1 + sum(ext in IMAGE_EXTENSIONS for ext in self.FORMATS)
        assert len(paths) == expected
        for path in paths:
            assert load_image(path).size == (40, 32)
        (line,) = [r.getMessage() for r in caplog.records]
        assert "skipped 6 file(s) that are not images" in line
        assert "'notes.txt', 'v.svg', 'w.mp4', 'x.heic', 'y.cr2', ..." in line
        assert ".DS_Store" not in line


# ---------------------------------------------------------------------------------------
# 3. Names with spaces, semicolons, newlines through predictions.csv and pairs.txt
# ---------------------------------------------------------------------------------------


class TestOutputNames:
    ODD = ["plain", "with space", "semi;colon", "new\nline", "café ünï", 'comma,"quote"']

    def _eval(self, tmp_path, odd_names):
        # VG names carry the UTM and any text: place i at east 500000 + 1000 i.
        root = tmp_path / "vg"
        for i, odd in enumerate(odd_names):
            name = f"@{500000 + 1000 * i}@4000000@{odd}@.jpg"
            _photo(root / "images" / "test" / "database" / name, (40 * i + 10, 200 - 30 * i, 90))
            _photo(root / "images" / "test" / "queries" / name, (40 * i + 12, 200 - 30 * i, 92))
        argv = [
            "eval", "--method", "_silent_mean_colour", "--weights", "random",
            "--dataset_folder", str(root), "--num_workers", "0", "--recall_values", "1", "3",
            "--save_dir", str(tmp_path / "runs"),
        ]  # fmt: skip
        assert cli_main(argv) == 0
        (run,) = [p for p in (tmp_path / "runs").glob("*/*") if p.is_dir()]
        with open(run / "predictions.csv", newline="", encoding="utf-8") as f:
            return run, list(csv.DictReader(f))

    def test_every_name_round_trips_and_pairs_txt_is_not_broken(self, tmp_path):
        run, rows = self._eval(tmp_path, self.ODD)
        names = sorted(f"@{500000 + 1000 * i}@4000000@{odd}@.jpg" for i, odd in enumerate(self.ODD))
        assert [r["query"] for r in rows] == [f"queries/{n}" for n in names]
        for i, row in enumerate(rows):
            predictions = json.loads(row["predictions"])
            assert len(predictions) == 3 and predictions[0] == f"database/{names[i]}"
            assert all(isinstance(d, float) for d in json.loads(row["distances"]))
            assert json.loads(row["positives"]) == [i]
            assert row["correct_at_1"] == "True" and row["first_correct_rank"] == "1"
        assert not (run / "pairs.txt").exists()
        log = (run / "log.txt").read_text(encoding="utf-8")
        assert "pairs.txt not written" in log and "whitespace" in log

    def test_pairs_txt_written_when_every_name_fits(self, tmp_path):
        run, rows = self._eval(tmp_path, ["semi;colon", "café", 'comma,"quote"'])
        pairs = (run / "pairs.txt").read_text(encoding="utf-8").splitlines()
        assert len(pairs) == 3 * 3
        assert [p.split() for p in pairs[:3]] == [
            [rows[0]["query"], name] for name in json.loads(rows[0]["predictions"])
        ]


# ---------------------------------------------------------------------------------------
# 4. Mixed aspect ratios with one --image_size value
# ---------------------------------------------------------------------------------------


class TestMixedAspectRatios:
    def test_batches_of_one_shape_keep_the_input_order(self):
        assert same_shape_batches([None] * 7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
        shapes = ["a", "b", "a", "a", "b", "c", "a"]
        assert same_shape_batches(shapes, 2) == [[0, 2], [1, 4], [3, 6], [5]]

    def test_header_shape_equals_the_preprocessed_one(self, tmp_path):
        path = _photo(tmp_path / "tall.jpg", (1, 2, 3), size=(30, 50))
        rotated = tmp_path / "rotated.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 270: width and height swap
        Image.open(path).save(rotated, exif=exif)
        for size in (None, 16, (20, 10)):
            pre = Preprocess(image_size=size)
            for p in (path, rotated):
                assert input_hw(p, pre) == tuple(pre(load_image(p)).shape[1:]), (p, size)

    def test_toy_unlabeled_queries(self, shared_data):
        paths = sorted((shared_data / "toy_unlabeled" / "queries").glob("*.jpg"))
        pre = Preprocess(image_size=56)
        assert len({input_hw(p, pre) for p in paths}) > 1  # mixed aspect ratios
        model = MeanColour()
        batched = extract_global_descriptors(model, paths, pre, batch_size=4)
        alone = np.concatenate(
            [extract_global_descriptors(model, [p], pre, batch_size=1) for p in paths]
        )
        np.testing.assert_array_equal(batched, alone)  # and therefore in input order

    def test_generated_images_and_fixed_size_unchanged(self, tmp_path):
        sizes = [(40, 30), (30, 40), (40, 30), (50, 50), (30, 40), (40, 30)]
        paths = [
            _photo(tmp_path / f"{i}.png", (30 * i, 10, 90), size=s) for i, s in enumerate(sizes)
        ]
        model = MeanColour()
        for pre in (Preprocess(image_size=24), Preprocess(image_size=(24, 24))):
            batched = extract_global_descriptors(model, paths, pre, batch_size=2)
            alone = np.concatenate(
                [extract_global_descriptors(model, [p], pre, batch_size=1) for p in paths]
            )
            np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-6)
            assert np.unique(batched, axis=0).shape[0] == len(paths)

    def test_local_features_of_mixed_shapes_refused(self, tmp_path):
        paths = [
            _photo(tmp_path / f"{i}.jpg", (9, 9, 9), size=s)
            for i, s in enumerate([(40, 30), (30, 40)])
        ]
        with pytest.raises(VprkitError, match=r"one input size.*1.jpg.*--image_size H W"):
            extract(MeanColour(), paths, tmp_path / "feats", preprocess=Preprocess(image_size=24),
                    root=tmp_path, local=True)  # fmt: skip
        assert not (tmp_path / "feats").exists()
        feats = extract(
            MeanColour(),
            paths,
            preprocess=Preprocess(image_size=(24, 24)),
            root=tmp_path,
            local=True,
        )
        assert feats.local.feature_shape == (3, 6, 6)


# ---------------------------------------------------------------------------------------
# 5. The radius of positives on a Mapillary SLS root
# ---------------------------------------------------------------------------------------


class TestMslsRadius:
    @pytest.fixture
    def root(self, tmp_path):
        from tests.test_msls import CPH_DB, CPH_Q, SF_DB, SF_Q, write_side

        base = tmp_path / "msls"
        for city, db, q in (("cph", CPH_DB, CPH_Q), ("sf", SF_DB, SF_Q)):
            write_side(base / "train_val" / city / "database", city, db)
            write_side(base / "train_val" / city / "query", city, q)
        return base

    def test_open_dataset_honours_the_radius_and_the_cache_keys_on_it(self, root):
        default = open_dataset(root)
        near = open_dataset(root, positive_dist_threshold=10.0)
        far = open_dataset(root, positive_dist_threshold=500.0)
        assert [p.tolist() for p in default.positives][:2] == [[0, 1, 2], [3]]
        assert [p.tolist() for p in near.positives][:2] == [[0], [3]]
        assert far.num_queries > default.num_queries  # fewer queries without a positive
        assert len(list((root / ".vprkit_msls_cache").glob("*.npz"))) == 3
        again = open_dataset(root, positive_dist_threshold=10.0)
        assert again.from_cache and [p.tolist() for p in again.positives] == [
            p.tolist() for p in near.positives
        ]
        assert dataset_positives(near, 10.0) is near.positives
        with pytest.raises(VprkitError, match="within 10 m, not 25 m"):
            dataset_positives(near, 25.0)

    def test_training_validation_reads_the_radius(self, root):
        from vprkit.train.loop import load_validation_set

        ds = load_validation_set(root, "val", 10.0)
        assert [p.tolist() for p in ds.positives][:2] == [[0], [3]]

    def test_vprkit_eval_passes_the_radius(self, root):
        for path in sorted(root.rglob("*.jpg")):
            _photo(path, (hash(path.name) % 256, 10, 10), size=(28, 28))
        argv = [
            "eval", "--method", "_silent_mean_colour", "--weights", "random",
            "--dataset_folder", str(root), "--num_workers", "0", "--recall_values", "1",
        ]  # fmt: skip
        positives = {}
        for radius in ("25", "10"):
            save_dir = root.parent / f"runs{radius}"
            assert (
                cli_main([*argv, "--positive_dist_threshold", radius, "--save_dir", str(save_dir)])
                == 0
            )
            (run,) = save_dir.glob("*/*")
            with open(run / "predictions.csv", newline="", encoding="utf-8") as f:
                positives[radius] = [json.loads(r["positives"]) for r in csv.DictReader(f)]
        assert positives["25"][0] == [0, 1, 2] and positives["10"][0] == [0]

    def test_other_formats_still_take_any_radius(self, tmp_path):
        from tests.test_datasets import make_vg

        ds = open_dataset(make_vg(tmp_path), positive_dist_threshold=5.0)
        assert ds.layout == "vg"


# ---------------------------------------------------------------------------------------
# 6. SelaVPR's official order of equal mutual-NN counts
# ---------------------------------------------------------------------------------------


class TestTieOrder:
    # Counts with many ties, as on small maps.
    COUNTS = np.random.default_rng(3).integers(0, 5, 100)

    def test_official_is_the_official_line(self):
        # test.rerank: local_sim(...) is a float32 tensor (torch.zeros(N) filled with counts),
        # then .cpu().numpy().argsort()[::-1].
        official = torch.tensor(self.COUNTS.tolist(), dtype=torch.float32).numpy().argsort()[::-1]
        np.testing.assert_array_equal(descending_order(self.COUNTS, "official"), official)
        np.testing.assert_array_equal(
            descending_order(self.COUNTS.astype(np.float32), "official"), official
        )
        stable = descending_order(self.COUNTS, "stable")
        np.testing.assert_array_equal(stable, np.argsort(-self.COUNTS, kind="stable"))
        np.testing.assert_array_equal(descending_order(self.COUNTS), stable)  # the default
        # Same scores in the same descending sequence; only the ties differ.
        np.testing.assert_array_equal(self.COUNTS[official], self.COUNTS[stable])
        assert not np.array_equal(official, stable)

    def test_rerank_order_and_mnn_take_the_option(self):
        predictions = np.arange(100)[None] + 1000
        orders, scores = rerank_order(
            predictions, 100, lambda q, c: self.COUNTS, tie_order="official"
        )
        np.testing.assert_array_equal(orders[0], descending_order(self.COUNTS, "official"))
        np.testing.assert_array_equal(scores[0], self.COUNTS[orders[0]])
        query = torch.eye(4)
        cands = torch.stack([torch.eye(4)] * 3)  # three candidates with the same count
        assert rerank_by_mnn(query, cands, [7, 8, 9]) == [7, 8, 9]
        official = np.argsort(np.array([4, 4, 4], dtype=np.float32))[::-1]
        assert rerank_by_mnn(query, cands, [7, 8, 9], tie_order="official") == [
            [7, 8, 9][i] for i in official
        ]
        with pytest.raises(VprkitError, match="tie_order"):
            descending_order([1, 2], "random")

    def test_selavpr_declares_the_official_order_for_its_own_reranker(self):
        info = model_info("selavpr")
        assert info.default_tie_order("mnn") == "official"
        assert info.default_tie_order("ransac_homography") == "stable"
        assert model_info("r2former").default_tie_order("r2former") == "stable"
        assert ModelInfo().tie_order == "stable"
