"""GSV-Cities reader, place dataset and the place / shard samplers, on a tiny tree."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vprkit.data.gsv_cities import (
    CITY_ID_OFFSET,
    GSV_COLUMNS,
    GSVCitiesDataset,
    collate_places,
    gsv_image_name,
    read_gsv_cities,
)
from vprkit.data.images import resize, to_tensor
from vprkit.train.samplers import DistributedShardSampler, PlaceBatchSampler

# Images per place; the 3s fall below the official minimum of 4 and are dropped.
COUNTS = [4, 5, 6, 3, 4, 4, 6, 5, 3, 4, 4, 4]
CITY_CENTRES = {"Boston": (42.3601, -71.0589), "London": (51.5074, -0.1278)}
PANO_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def make_tree(root: Path, seed: int = 0) -> dict[str, list[list[object]]]:
    """Two cities of 12 places each, 3-6 tiny JPEGs a place; returns the CSV rows by city."""
    rng = np.random.default_rng(seed)
    (root / "Dataframes").mkdir(parents=True)
    all_rows = {}
    image_number = 0
    for city, (lat0, lon0) in CITY_CENTRES.items():
        (root / "Images" / city).mkdir(parents=True)
        # Place 13 exists in both cities: only the offset tells them apart.
        place_ids = [13] + sorted(rng.choice(np.arange(14, 99_999), 11, replace=False).tolist())
        rows = []
        for place_id, count in zip(place_ids, COUNTS, strict=True):
            for _ in range(count):
                year, month = int(rng.integers(2007, 2022)), int(rng.integers(1, 13))
                northdeg = int(rng.integers(0, 360))
                # Trailing zero on purpose: the official name uses str(float(text)), not text.
                lat = f"{lat0 + rng.uniform(-0.05, 0.05):.6f}0"
                lon = f"{lon0 + rng.uniform(-0.05, 0.05):.7f}"
                panoid = "".join(rng.choice(list(PANO_CHARS), 22))
                rows.append([place_id, year, month, northdeg, city, lat, lon, panoid])
                name = gsv_image_name(
                    city, place_id, year, month, northdeg, float(lat), float(lon), panoid
                )
                # The grey level numbers the images, so tests can tell a place's files apart
                # (grey at quality 100 survives JPEG; chroma would be quantised together).
                image_number += 1
                grey = 2 * image_number
                Image.new("RGB", (12, 10), (grey,) * 3).save(
                    root / "Images" / city / name, quality=100
                )
        order = rng.permutation(len(rows))  # Real CSVs are not sorted by place.
        rows = [rows[i] for i in order]
        _write_csv(root / "Dataframes" / f"{city}.csv", list(GSV_COLUMNS), rows)
        all_rows[city] = rows
    return all_rows


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, list[list[object]]]]:
    root = tmp_path / "gsv_cities"
    return root, make_tree(root)


def _transform(img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
    # A random flip, so tests can see that augmentations follow the seeded generator.
    t = to_tensor(resize(img, (8, 8)))
    return t.flip(-1) if rng.random() < 0.5 else t


# --------------------------------------------------------------------------- reader


def test_image_name_official_format() -> None:
    # city_id_placeid(7)_year(4)_month(2)_northdeg(3)_str(lat)_str(lon)_panoid.jpg
    name = gsv_image_name("London", 13, 2017, 5, 7, 51.50740, -0.1277583, "aB-c_d")
    assert name == "London_0000013_2017_05_007_51.5074_-0.1277583_aB-c_d.jpg"
    # The place id in the name is the CSV's, without the city offset (row.name % 10**5).
    assert gsv_image_name("Boston", 100013, 2020, 12, 359, 42.0, -71.5, "x").startswith(
        "Boston_0000013_2020_12_359_42.0_-71.5_x"
    )


def test_read_builds_official_paths(tree) -> None:
    root, rows = tree
    data = read_gsv_cities(root, check_files="all")
    assert data.cities == ("Boston", "London")  # The official order: Boston before London.
    by_label = dict(zip(data.place_labels.tolist(), data.place_images, strict=True))
    for c, city in enumerate(data.cities):
        for place_id, year, month, northdeg, city_id, lat, lon, panoid in rows[city]:
            label = place_id + c * CITY_ID_OFFSET
            if label not in by_label:
                continue  # A dropped place.
            expected = (
                f"{city_id}_{place_id:07d}_{year}_{month:02d}_{northdeg:03d}_"
                f"{float(lat)}_{float(lon)}_{panoid}.jpg"
            )
            assert str(root / "Images" / city_id / expected) in by_label[label]
            assert not lat.endswith("0") or lat.rstrip("0") in expected
    for paths in data.place_images:
        assert all(Path(p).is_file() for p in paths)


def test_place_label_offsets_unique(tree) -> None:
    root, _ = tree
    data = read_gsv_cities(root, cities=["London", "Boston"])
    labels = data.place_labels
    assert len(np.unique(labels)) == len(labels) == len(data)
    # Place 13 of the first city keeps its id, the second city's gets + 1 * 10**5.
    assert 13 in labels and 100_013 in labels
    assert data.cities == ("London", "Boston")
    assert np.all(labels[data.place_cities == 0] < CITY_ID_OFFSET)
    assert np.all(labels[data.place_cities == 1] >= CITY_ID_OFFSET)
    for label, city, paths in zip(labels, data.place_cities, data.place_images, strict=True):
        assert all(f"_{label % CITY_ID_OFFSET:07d}_" in Path(p).name for p in paths)
        assert all(Path(p).parent.name == data.cities[city] for p in paths)


def test_filtering_small_places(tree, caplog) -> None:
    root, _ = tree
    with caplog.at_level(logging.WARNING, logger="vprkit.data.gsv_cities"):
        data = read_gsv_cities(root)
    kept_per_city = sum(n >= 4 for n in COUNTS)
    assert len(data) == 2 * kept_per_city
    assert data.num_dropped_places == 2 * sum(n < 4 for n in COUNTS)
    assert data.num_dropped_images == 2 * sum(n for n in COUNTS if n < 4)
    assert data.num_images == 2 * sum(n for n in COUNTS if n >= 4)
    assert min(len(p) for p in data.place_images) == data.min_images_per_place == 4
    assert "dropped 4 places (12 images)" in caplog.text
    assert len(read_gsv_cities(root, min_images_per_place=3)) == 2 * len(COUNTS)
    assert len(read_gsv_cities(root, min_images_per_place=6)) == 2 * COUNTS.count(6)
    with pytest.raises(ValueError, match="no place has at least 7 images"):
        read_gsv_cities(root, min_images_per_place=7)


def test_error_missing_folders_and_csv(tmp_path, tree) -> None:
    root, _ = tree
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_gsv_cities(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"Paris\.csv does not exist \(city 'Paris'\)"):
        read_gsv_cities(root, cities=["Boston", "Paris"])
    with pytest.raises(ValueError, match="more than once"):
        read_gsv_cities(root, cities=["Boston", "Boston"])
    with pytest.raises(ValueError, match="check_files"):
        read_gsv_cities(root, check_files="some")
    (root / "Dataframes").rename(root / "frames")
    with pytest.raises(FileNotFoundError, match="Dataframes"):
        read_gsv_cities(root)


def test_error_columns(tree) -> None:
    root, rows = tree
    csv_path = root / "Dataframes" / "London.csv"
    header = [c for c in GSV_COLUMNS if c != "panoid"]
    _write_csv(csv_path, header, [r[:-1] for r in rows["London"]])
    with pytest.raises(ValueError, match=r"London\.csv.*missing \['panoid'\]"):
        read_gsv_cities(root)
    _write_csv(csv_path, [*GSV_COLUMNS, "heading"], [[*r, 1] for r in rows["London"]])
    with pytest.raises(ValueError, match=r"London\.csv.*unexpected \['heading'\]"):
        read_gsv_cities(root)
    # Columns in another order are fine: they are found by name.
    _write_csv(csv_path, list(GSV_COLUMNS[::-1]), [r[::-1] for r in rows["London"]])
    assert len(read_gsv_cities(root)) == 2 * sum(n >= 4 for n in COUNTS)


def test_error_empty_csv(tree) -> None:
    root, _ = tree
    csv_path = root / "Dataframes" / "Boston.csv"
    _write_csv(csv_path, list(GSV_COLUMNS), [])
    with pytest.raises(ValueError, match=r"Boston\.csv has a header but no rows"):
        read_gsv_cities(root)
    csv_path.write_text("")
    with pytest.raises(ValueError, match=r"Boston\.csv is empty"):
        read_gsv_cities(root)


def test_error_bad_row_named(tree) -> None:
    root, rows = tree
    csv_path = root / "Dataframes" / "Boston.csv"
    bad = [list(r) for r in rows["Boston"]]
    bad[4][0] = "13.5"
    _write_csv(csv_path, list(GSV_COLUMNS), bad)
    with pytest.raises(ValueError, match=r"Boston\.csv row 5 \(line 6\).*place_id.*'13\.5'"):
        read_gsv_cities(root)
    bad[4][0] = 100_000
    _write_csv(csv_path, list(GSV_COLUMNS), bad)
    with pytest.raises(ValueError, match=r"row 5 \(line 6\): place_id must be in \[0, 100000\)"):
        read_gsv_cities(root)
    bad[4] = list(rows["Boston"][4])
    bad[2][5] = "north"
    _write_csv(csv_path, list(GSV_COLUMNS), bad)
    with pytest.raises(ValueError, match=r"row 3 \(line 4\): column 'lat'"):
        read_gsv_cities(root)
    bad[2] = list(rows["Boston"][2])
    bad.append(list(bad[0]))
    _write_csv(csv_path, list(GSV_COLUMNS), bad)
    with pytest.raises(ValueError, match=rf"row {len(bad)} .*same image .* as .*row 1 "):
        read_gsv_cities(root)


def test_error_missing_image_named(tree) -> None:
    root, rows = tree
    data = read_gsv_cities(root)
    # Remove one image of a kept London place and find the CSV row that names it.
    victim = Path(data.place_images[-1][1])
    victim.unlink()
    row_number = next(
        i
        for i, r in enumerate(rows["London"], start=1)
        if victim.name.endswith(f"_{r[-1]}.jpg") and f"_{r[0]:07d}_" in victim.name
    )
    with pytest.raises(FileNotFoundError) as info:
        read_gsv_cities(root, check_files="all")
    message = str(info.value)
    assert f"London.csv row {row_number} (line {row_number + 1})" in message
    assert victim.name in message and "1 of" in message
    # A whole missing city folder is caught by the default sampled check, and named.
    for p in (root / "Images" / "Boston").iterdir():
        p.unlink()
    (root / "Images" / "Boston").rmdir()
    with pytest.raises(FileNotFoundError, match=r"Boston\.csv row .*Images/Boston does not"):
        read_gsv_cities(root)


# --------------------------------------------------------------------------- dataset


def test_dataset_items(tree) -> None:
    root, _ = tree
    data = read_gsv_cities(root)
    ds = GSVCitiesDataset(data, images_per_place=4, transform=_transform, seed=3)
    assert len(ds) == len(data)
    images, labels = ds[2]
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [int(data.place_labels[2])] * 4
    # Four different images of the place (no replacement): each file has its own grey.
    big = GSVCitiesDataset(data, images_per_place=4, transform=lambda img, rng: to_tensor(img))
    for i in range(len(big)):
        greys = (big[i][0].mean(dim=(1, 2, 3)) * 255).round().tolist()
        assert len(set(greys)) == 4
    # Deterministic by (seed, epoch, index); another epoch draws other images.
    again = GSVCitiesDataset(data, images_per_place=4, transform=_transform, seed=3)
    assert torch.equal(again[2][0], images)
    draws = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        draws.add(tuple(ds[1][0].flatten()[::7].tolist()))
    assert len(draws) > 1
    # The default transform: ToTensor + ImageNet normalisation, at the file's size.
    plain = GSVCitiesDataset(data, images_per_place=2)
    assert plain[0][0].shape == (2, 3, 10, 12) and plain[0][0].min() < 0


def test_dataset_errors(tree) -> None:
    root, _ = tree
    data = read_gsv_cities(root)
    with pytest.raises(ValueError, match="images_per_place=5 .* fewest images of a place \\(4\\)"):
        GSVCitiesDataset(data, images_per_place=5)
    with pytest.raises(TypeError, match="GSVCities"):
        GSVCitiesDataset([["a.jpg"]])  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        GSVCitiesDataset(data)[len(data)]


def test_collate_places_shapes() -> None:
    batch = [(torch.full((4, 3, 5, 6), float(i)), torch.full((4,), 10 + i)) for i in range(3)]
    images, labels = collate_places(batch)
    assert images.shape == (12, 3, 5, 6) and labels.shape == (12,)
    # Place-major, as images.view(BS*N, ...) in the official loop.
    assert labels.tolist() == [10] * 4 + [11] * 4 + [12] * 4
    assert torch.equal(images[4:8], batch[1][0])
    with pytest.raises(ValueError, match="empty"):
        collate_places([])


def test_dataloader_steps(tree) -> None:
    root, _ = tree
    data = read_gsv_cities(root)
    ds = GSVCitiesDataset(data, images_per_place=4, transform=_transform)
    sampler = PlaceBatchSampler(ds.place_cities, places_per_batch=4, drop_last=True)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=collate_places, num_workers=0
    )
    steps = list(loader)
    assert len(steps) == len(loader) == len(data) // 4
    seen = []
    for images, labels in steps:
        assert images.shape == (16, 3, 8, 8) and labels.shape == (16,)
        per_place = labels.view(4, 4)
        assert torch.all(per_place == per_place[:, :1])  # K images of one place together
        assert len(set(per_place[:, 0].tolist())) == 4
        seen.extend(per_place[:, 0].tolist())
    assert len(seen) == len(set(seen)) == len(data)  # 20 places, 5 full batches


def test_dataloader_workers_reproduce(tree) -> None:
    # Items are seeded by (seed, epoch, place), so worker count and resuming change nothing.
    root, _ = tree
    ds = GSVCitiesDataset(read_gsv_cities(root), transform=_transform, seed=1, epoch=2)

    def run(workers: int, start_batch: int = 0) -> list[torch.Tensor]:
        sampler = PlaceBatchSampler(ds.place_cities, 4, seed=1, epoch=2, start_batch=start_batch)
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, collate_fn=collate_places, num_workers=workers
        )
        return [images for images, _ in loader]

    one, two = run(0), run(2)
    assert len(one) == len(two) == 5
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(one[3:], run(0, start_batch=3), strict=True))


# --------------------------------------------------------------------------- samplers

CITIES = np.repeat([0, 1, 2], [50, 70, 30])  # 150 places in three cities


def test_place_batches_cover_epoch() -> None:
    sampler = PlaceBatchSampler(CITIES, places_per_batch=8, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 19  # 18 full and 6 left over (drop_last=False)
    assert [len(b) for b in batches] == [8] * 18 + [6]
    assert all(len(set(b)) == len(b) for b in batches)
    flat = [p for b in batches for p in b]
    assert sorted(flat) == list(range(150))
    dropped = PlaceBatchSampler(CITIES, places_per_batch=8, seed=1, drop_last=True)
    batches = list(dropped)
    assert len(batches) == len(dropped) == 18 and all(len(b) == 8 for b in batches)
    flat = [p for b in batches for p in b]
    assert len(set(flat)) == 144  # six places sit this epoch out
    with pytest.raises(ValueError, match="no batch"):
        PlaceBatchSampler(5, places_per_batch=8, drop_last=True)


def test_place_batches_deterministic_and_epochs() -> None:
    a = PlaceBatchSampler(CITIES, places_per_batch=8, seed=5)
    b = PlaceBatchSampler(CITIES, places_per_batch=8, seed=5)
    assert list(a) == list(b)
    assert list(a) != list(PlaceBatchSampler(CITIES, places_per_batch=8, seed=6))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert sorted(p for batch in a for p in batch) == list(range(150))
    a.set_epoch(0)
    assert list(a) == first
    # reshuffle=False: CricaVPR shuffles once, when it builds the dataset.
    fixed = PlaceBatchSampler(CITIES, places_per_batch=8, seed=5, reshuffle=False)
    order = list(fixed)
    fixed.set_epoch(3)
    assert list(fixed) == order == first


def test_place_batches_city_grouped() -> None:
    grouped = PlaceBatchSampler(CITIES, places_per_batch=8, seed=0)
    mixed = PlaceBatchSampler(CITIES, places_per_batch=8, seed=0, city_grouped=False)

    def single_city(sampler: PlaceBatchSampler) -> int:
        return sum(len(set(CITIES[b].tolist())) == 1 for b in sampler)

    # Only batches across a city boundary mix cities (at most one per boundary).
    assert single_city(grouped) >= len(grouped) - 2
    assert single_city(mixed) <= 2
    order = grouped.place_order()
    assert CITIES[order].tolist() == sorted(CITIES.tolist())  # cities in index order
    assert order[:50].tolist() != list(range(50))  # but shuffled inside each


@pytest.mark.parametrize("n_places, replicas", [(150, 2), (150, 4), (148, 4), (144, 8)])
def test_place_batches_ranks_partition_global_batches(n_places: int, replicas: int) -> None:
    cities = CITIES[:n_places]
    single = PlaceBatchSampler(cities, places_per_batch=8, seed=2, epoch=4, num_replicas=1)
    ranks = [
        PlaceBatchSampler(
            cities, places_per_batch=8, seed=2, epoch=4, num_replicas=replicas, rank=r
        )
        for r in range(replicas)
    ]
    per_rank = [list(s) for s in ranks]
    assert len({len(batches) for batches in per_rank}) == 1  # same number of steps everywhere
    for step, global_batch in enumerate(single):
        shares = [batches[step] for batches in per_rank]
        assert sum(shares, []) == global_batch  # contiguous slices in rank order
        if len(global_batch) == 8:
            assert all(len(s) == 8 // replicas for s in shares)
        flat = [p for s in shares for p in s]
        assert len(flat) == len(set(flat))


def test_place_batches_ddp_edge_cases() -> None:
    # 25 places, 8 per batch: the last batch of one place cannot feed two ranks.
    two = [PlaceBatchSampler(25, places_per_batch=8, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(two[0]) == len(two[1]) == 3
    assert [len(b) for b in two[0]] == [4, 4, 4]
    assert len(PlaceBatchSampler(25, places_per_batch=8)) == 4
    with pytest.raises(ValueError, match="divisible by num_replicas=3"):
        PlaceBatchSampler(CITIES, places_per_batch=8, num_replicas=3, rank=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        PlaceBatchSampler(CITIES, places_per_batch=8, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="place_cities"):
        PlaceBatchSampler([0.5, 1.5], places_per_batch=2)


def test_place_batches_start_batch_resumes() -> None:
    full = list(PlaceBatchSampler(CITIES, places_per_batch=8, seed=9, epoch=2))
    resumed = PlaceBatchSampler(CITIES, places_per_batch=8, seed=9, epoch=2, start_batch=7)
    assert len(resumed) == len(full) - 7
    assert list(resumed) == full[7:]
    resumed.set_epoch(3)  # the next epoch starts from its beginning
    assert len(list(resumed)) == len(full)
    resumed.set_epoch(2, start_batch=len(full))
    assert list(resumed) == [] and len(resumed) == 0
    with pytest.raises(ValueError, match="past the end"):
        resumed.set_epoch(2, start_batch=len(full) + 1)
    # Per rank too: resuming two ranks gives the tail of their own batches.
    r1 = PlaceBatchSampler(CITIES, places_per_batch=8, seed=9, num_replicas=2, rank=1)
    tail = PlaceBatchSampler(
        CITIES, places_per_batch=8, seed=9, num_replicas=2, rank=1, start_batch=5
    )
    assert list(tail) == list(r1)[5:]


def test_shard_sampler_disjoint_and_padding() -> None:
    n = 103
    for drop_last in (False, True):
        shards = [
            list(DistributedShardSampler(n, num_replicas=4, rank=r, seed=1, drop_last=drop_last))
            for r in range(4)
        ]
        assert len({len(s) for s in shards}) == 1
        flat = [i for s in shards for i in s]
        if drop_last:
            assert len(flat) == len(set(flat)) == 100  # 3 indices dropped this epoch
        else:
            assert len(flat) == 104 and set(flat) == set(range(n))  # one index padded twice
    sampler = DistributedShardSampler(range(10, 20), shuffle=False, num_replicas=3, rank=1)
    assert list(sampler) == [11, 14, 17, 10]  # strided; padding repeats the list's start
    tiny = [list(DistributedShardSampler(2, num_replicas=5, rank=r)) for r in range(5)]
    assert all(len(s) == 1 for s in tiny)  # padding longer than the list wraps around
    with pytest.raises(ValueError, match="leave none"):
        DistributedShardSampler(2, num_replicas=5, rank=0, drop_last=True)


def test_shard_sampler_deterministic_and_resume() -> None:
    a = DistributedShardSampler(50, num_replicas=2, rank=0, seed=4)
    assert list(a) == list(DistributedShardSampler(50, num_replicas=2, rank=0, seed=4))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0, start_index=10)
    assert list(a) == first[10:] and len(a) == 15
    with pytest.raises(ValueError, match="past the end"):
        a.set_epoch(0, start_index=26)
