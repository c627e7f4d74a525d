"""
Images per second per CPU core of the pre-training data pipeline, side by side in one run.

Timed on the same ImageNet-like JPEGs (made offline: 500x375, quality 90, cut from the photographs scikit-learn ships),
or on a folder of your own (`--train_dir`, an imagefolder with class sub-folders):

- `today`: the collator before the fast path (PIL decode, PIL crop + bilinear resize, the ViT image processor);
- `authors`: a restatement of the authors' pipeline (ImageFolder-style PIL loading, RandomResizedCrop(0.3-1.0) on
  the PIL image, ToTensor, Normalize, one image at a time, then their per-image multi-block mask collator);
- `ours float` / `ours uint8`: `IJepaPretrainingCollator` on the map-style imagefolder dataset, with float32
  normalised output or `uint8` output (normalised later on the training device);
- `ours uint8 full-size decode`: the same, with `reduced_decode=False` (JPEGs always decoded at full size; the
  reduced-size decode only applies to crops at least twice the output size on each side, i.e. to larger images);
- `ours uint8 streamed`: the same collator on a `datasets` stream of parquet shards (decoded from bytes, no files);
- `decode floor`: reading and decoding each JPEG to RGB and nothing else, with PIL and with libjpeg-turbo
  (`simplejpeg`, the decoder ours uses).

Every single-core path runs in this process with one torch thread (the work of one DataLoader worker, including
reading the examples from the dataset), round after round, so that machine load hits all paths alike; the table
gives the median and the range over rounds and ratios taken within each round, per CPU second of the process (the
cost of the work, what a core spends) and per wall-clock second (which also counts time other jobs held the core).
Then real DataLoaders with 1 and 2 worker processes time whole passes over the data, also in interleaved rounds,
and report the CPU cores their workers got: on a shared machine a second worker can only help as much as a free core
is there. Finally the number of CPU cores that would feed one GPU consuming `--gpu_images_per_second` (93: the
authors' ViT-H/14 run, 300 epochs of ImageNet in 72 h on 16 A100), from the images per CPU second.

    python -m benchmarks.benchmark_data                 # 400 images, 3 rounds, 1 and 2 workers (about 2 min)
    python -m benchmarks.benchmark_data --quick         # a few seconds, for a smoke test
    python benchmarks/benchmark_data.py --quick         # the same, run as a file
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


if not __package__:  # run as a file: import `benchmarks` / `training_scripts` from the repository root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.reference_ijepa import ReferenceMaskCollator  # noqa: E402
from modeling_ijepa.configuration_ijepa import IJepaConfig  # noqa: E402
from modeling_ijepa.data import (  # noqa: E402
    IJepaPretrainingCollator,
    decode_image,
    decode_image_array,
    default_image_processor,
    load_image_dataset,
    random_resized_crop,
)
from modeling_ijepa.masking import MultiBlockMaskSampler  # noqa: E402


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------------
# Data made offline
# ---------------------------------------------------------------------------------------------------------------------
def make_jpegs(
    folder: Path, num_images: int, width: int = 500, height: int = 375, quality: int = 90, num_classes: int = 4
) -> list[Path]:
    """
    Write `num_images` distinct JPEGs of `width` x `height` into `folder/class_<k>/`: random crops (25-100 % of the
    area) of scikit-learn's two sample photographs, resized, flipped at random, with brightness and sensor-like noise
    jitter so that no two files are alike. Returns the paths.
    """
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    paths = []
    for index in range(num_images):
        photo = photos[index % len(photos)]
        photo_height, photo_width = photo.shape[:2]
        area = rng.uniform(0.25, 1.0) * photo_height * photo_width
        aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.6)))
        crop_width = min(photo_width, int(math.sqrt(area * aspect)))
        crop_height = min(photo_height, int(math.sqrt(area / aspect)))
        top = int(rng.integers(0, photo_height - crop_height + 1))
        left = int(rng.integers(0, photo_width - crop_width + 1))
        image = Image.fromarray(photo[top : top + crop_height, left : left + crop_width])
        image = image.resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image).astype(np.float32) * rng.uniform(0.8, 1.2)
        pixels += rng.normal(0.0, 3.0, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        path = folder / f"class_{index % num_classes}" / f"image_{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


def write_parquet_shards(paths: list[Path], folder: Path, num_shards: int) -> None:
    """The JPEG bytes (undecoded) and labels as `num_shards` parquet files, the way image datasets live on the hub."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    table = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": path.read_bytes(), "path": None} for path in paths],
            "label": [int(path.parent.name.rsplit("_", 1)[-1]) if "_" in path.parent.name else 0 for path in paths],
        },
        features=features,
    )
    for shard in range(num_shards):
        table.shard(num_shards, shard, contiguous=True).to_parquet(str(folder / f"train-{shard:05d}.parquet"))


def list_image_files(folder: Path) -> list[tuple[Path, int]]:
    """ImageFolder-style listing: `(path, class index)` for every image under the class sub-folders, sorted."""
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    extensions = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
    return [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((folder / name).rglob("*"))
        if path.suffix.lower() in extensions
    ]


# ---------------------------------------------------------------------------------------------------------------------
# The pipelines compared
# ---------------------------------------------------------------------------------------------------------------------
class TodayCollator:
    """The pre-training collator as it was before the fast path: PIL decode, PIL crop + resize, the image processor."""

    def __init__(self, mask_sampler: MultiBlockMaskSampler, image_processor, crop_scale=(0.3, 1.0)):
        self.mask_sampler = mask_sampler
        self.image_processor = image_processor
        self.crop_scale = crop_scale
        self.size = (image_processor.size["height"], image_processor.size["width"])

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        images = [image for image in (decode_image(example["image"]) for example in examples) if image is not None]
        generator = self.mask_sampler.next_generator()
        crops = [random_resized_crop(image, self.size, generator, scale=self.crop_scale) for image in images]
        pixel_values = self.image_processor(images=crops, return_tensors="pt")["pixel_values"]
        context_indices, target_indices = self.mask_sampler.sample_masks(len(crops), generator)
        return {"pixel_values": pixel_values, "context_indices": context_indices, "target_indices": target_indices}


class AuthorsImageFolder(torch.utils.data.Dataset):
    """
    The authors' data path restated in plain torch / PIL: an ImageFolder whose `__getitem__` opens the file with PIL,
    converts it to RGB and applies RandomResizedCrop(scale), ToTensor and Normalize, one image at a time.
    """

    def __init__(self, files: list[tuple[Path, int]], size: int = 224, scale=(0.3, 1.0), seed: int = 0):
        self.files = files
        self.size = size
        self.scale = scale
        self.generator = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        with open(path, "rb") as file:
            image = Image.open(file).convert("RGB")
        image = random_resized_crop(image, (self.size, self.size), self.generator, scale=self.scale)  # bilinear, PIL
        # ToTensor, then Normalize
        tensor = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous().float().div(255)
        return (tensor - self.mean) / self.std, label


class AuthorsCollator:
    """`default_collate` of the (image, label) pairs, then the official per-image multi-block masks."""

    def __init__(self, mask_sampler: ReferenceMaskCollator, seed: int = 0):
        self.mask_sampler = mask_sampler
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: list[tuple[torch.Tensor, int]]):
        collated = torch.utils.data.default_collate(batch)
        masks_enc, masks_pred = self.mask_sampler.sample_masks(len(batch), self.generator)
        return collated, masks_enc, masks_pred


class ReadDecode:
    """Decode-only floor: read the file and decode it to an RGB array, with `decoder`, nothing else."""

    def __init__(self, decoder: str):
        self.decoder = decoder

    def __call__(self, examples: list[dict]) -> int:
        for example in examples:
            data = Path(example["path"]).read_bytes()
            if self.decoder == "pil":
                image = np.asarray(decode_image(data))
            else:
                image = decode_image_array(data)
            assert image is not None and image.ndim == 3
        return len(examples)


class PathList(torch.utils.data.Dataset):
    def __init__(self, files: list[tuple[Path, int]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        return {"path": str(self.files[index][0])}


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------
def _batches(num_items: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, num_items))) for start in range(0, num_items, batch_size)]


def time_in_process(dataset, collate, batch_size: int) -> tuple[float, float]:
    """
    One process doing a worker's job (fetch every example of a pass, collate in batches): images per CPU second of
    this process (all its threads), and images per wall-clock second. On a machine whose cores are shared the first
    is the cost of the work; the second also counts the time other jobs held the core.
    """
    import datasets

    start, start_cpu = time.perf_counter(), time.process_time()
    count = 0
    if not isinstance(dataset, datasets.IterableDataset):
        for indices in _batches(len(dataset), batch_size):
            if hasattr(dataset, "__getitems__"):
                examples = dataset.__getitems__(indices)
            else:
                examples = [dataset[i] for i in indices]
            collate(examples)
            count += len(indices)
    else:  # a stream
        examples = []
        for example in dataset:
            examples.append(example)
            if len(examples) == batch_size:
                collate(examples)
                count += len(examples)
                examples = []
        if examples:
            collate(examples)
            count += len(examples)
    cpu_seconds, seconds = time.process_time() - start_cpu, time.perf_counter() - start
    return count / max(cpu_seconds, 1e-9), count / seconds


def _batch_size_of(batch) -> int:
    if isinstance(batch, dict):
        return int(batch["pixel_values"].shape[0])
    return int(batch[0][0].shape[0])


class WorkerClock:
    """
    Wraps a collate function so that every batch also carries the id of the worker that made it and that worker's
    CPU seconds so far (`time.process_time()`, all its threads): the DataLoader timing then tells how many cores the
    workers actually got, apart from how fast they were.
    """

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples):
        batch = self.collate(examples)
        worker = torch.utils.data.get_worker_info()
        return batch, (worker.id if worker is not None else -1), time.process_time()


def time_loader(dataset, collate, batch_size: int, num_workers: int, passes: int) -> tuple[float, float]:
    """
    Images per second of a DataLoader with `num_workers` persistent workers over `passes` passes after a warm-up
    pass, and the CPU cores its workers used meanwhile (their CPU seconds over the wall-clock seconds).
    """
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=WorkerClock(collate),
        num_workers=num_workers,
        persistent_workers=True,
        prefetch_factor=4,
    )
    first_cpu, last_cpu = {}, {}
    for _, worker, cpu in loader:  # starts the workers and warms caches
        first_cpu[worker] = cpu
    start = time.perf_counter()
    count = 0
    for _ in range(passes):
        for batch, worker, cpu in loader:
            count += _batch_size_of(batch)
            last_cpu[worker] = cpu
    seconds = time.perf_counter() - start
    cpu_seconds = sum(last_cpu[worker] - first_cpu.get(worker, last_cpu[worker]) for worker in last_cpu)
    del loader
    return count / seconds, cpu_seconds / seconds


def _range(values: list[float], digits: int = 0) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    if digits == 0:
        return f"{mid:,.0f} ({low:,.0f}-{high:,.0f})"
    return f"{mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_dir", default=None, help="An imagefolder of your own (class sub-folders of JPEGs).")
    parser.add_argument("--num_images", type=int, default=400, help="Generated JPEGs (without --train_dir).")
    parser.add_argument("--image_width", type=int, default=500)
    parser.add_argument("--image_height", type=int, default=375)
    parser.add_argument("--image_size", type=int, default=224, help="Crop size fed to the model.")
    parser.add_argument("--patch_size", type=int, default=14)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of the single-core timings.")
    parser.add_argument("--passes", type=int, default=2, help="Timed passes over the data per DataLoader.")
    parser.add_argument("--num_shards", type=int, default=8, help="Parquet shards of the streamed copy.")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="DataLoader worker counts to time.")
    parser.add_argument("--gpu_images_per_second", type=float, default=93.0)
    parser.add_argument("--quick", action="store_true", help="32 small images, one round: a smoke test.")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.image_width, args.image_height = 32, 160, 120
        args.image_size, args.patch_size, args.batch_size = 96, 8, 16
        args.rounds, args.passes, args.num_shards = 1, 1, 2
    if args.image_size % args.patch_size:
        raise ValueError(f"--image_size {args.image_size} must be a multiple of --patch_size {args.patch_size}.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    work = tempfile.TemporaryDirectory(prefix="benchmark_data_")
    root = Path(work.name)
    if args.train_dir:
        image_folder = Path(args.train_dir)
        files = list_image_files(image_folder)
        if not files:
            raise ValueError(f"No images under class sub-folders of {args.train_dir!r}.")
    else:
        image_folder = root / "imagefolder"
        make_jpegs(image_folder, args.num_images, args.image_width, args.image_height)
        files = list_image_files(image_folder)
    write_parquet_shards([path for path, _ in files], root / "parquet", args.num_shards)
    mean_kb = sum(path.stat().st_size for path, _ in files) / len(files) / 1e3

    mapped = load_image_dataset(train_dir=str(image_folder), cache_dir=str(root / "cache"))
    streamed = load_image_dataset(train_dir=str(root / "parquet"), streaming=True)
    config = IJepaConfig(image_size=args.image_size, patch_size=args.patch_size)
    processor = default_image_processor(args.image_size)

    def ours(output_uint8: bool, reduced_decode: bool = True) -> IJepaPretrainingCollator:
        return IJepaPretrainingCollator(
            MultiBlockMaskSampler.from_config(config),
            processor,
            output_uint8=output_uint8,
            reduced_decode=reduced_decode,
        )

    authors_data = AuthorsImageFolder(files, size=args.image_size)
    authors_collate = AuthorsCollator(ReferenceMaskCollator.from_config(config))
    paths = PathList(files)
    today = TodayCollator(MultiBlockMaskSampler.from_config(config), processor)
    single = {
        "today's collator (PIL, image processor)": (mapped, today),
        "authors' pipeline (restated)": (authors_data, authors_collate),
        "ours, float32 out": (mapped, ours(False)),
        "ours, uint8 out": (mapped, ours(True)),
        "ours, uint8 out, full-size decode": (mapped, ours(True, reduced_decode=False)),
        "ours, uint8 out, streamed parquet": (streamed, ours(True)),
        "decode floor, PIL": (paths, ReadDecode("pil")),
        "decode floor, libjpeg-turbo (ours)": (paths, ReadDecode("simplejpeg")),
    }
    print(
        f"{len(files)} JPEGs, mean {mean_kb:.0f} kB ({'--train_dir' if args.train_dir else 'generated'}; "
        f"{args.image_width}x{args.image_height} q90 when generated), crops {args.image_size}px, batch "
        f"{args.batch_size}, masks on a {config.grid_size[0]}x{config.grid_size[1]} grid, torch threads 1, "
        f"{args.rounds} round(s), {os.cpu_count()} CPU cores visible",
        flush=True,
    )
    for dataset, collate in single.values():  # warm-up: file cache, lazy imports, first-call costs
        time_in_process(dataset, collate, args.batch_size)
    rates: dict[str, list[float]] = {name: [] for name in single}
    wall_rates: dict[str, list[float]] = {name: [] for name in single}
    for _ in range(args.rounds):
        for name, (dataset, collate) in single.items():
            cpu_rate, wall_rate = time_in_process(dataset, collate, args.batch_size)
            rates[name].append(cpu_rate)
            wall_rates[name].append(wall_rate)

    ours_name, today_name = "ours, uint8 out", "today's collator (PIL, image processor)"
    authors_name, floor_name = "authors' pipeline (restated)", "decode floor, libjpeg-turbo (ours)"
    print(
        "\n| path (one process, one core) | images per CPU second: median (range) | x today | x authors | "
        "images per wall second: median (range) |"
    )
    print("|---|---|---|---|---|")
    for name, values in rates.items():
        versus_today = [v / t for v, t in zip(values, rates[today_name])]
        versus_authors = [v / a for v, a in zip(values, rates[authors_name])]
        cells = [_range(values), _range(versus_today, 2), _range(versus_authors, 2), _range(wall_rates[name])]
        print(f"| {name} | " + " | ".join(cells) + " |")
    of_floor = [v / f for v, f in zip(rates[ours_name], rates[floor_name])]
    print(f"\nours (uint8) / its decode floor: {_range(of_floor, 2)}")
    streamed_ratio = [s / m for s, m in zip(rates["ours, uint8 out, streamed parquet"], rates[ours_name])]
    print(f"ours streamed / ours map-style: {_range(streamed_ratio, 2)}")
    reduced_ratio = [r / f for r, f in zip(rates[ours_name], rates["ours, uint8 out, full-size decode"])]
    print(f"ours / ours with full-size decode: {_range(reduced_ratio, 2)}")
    pixel_bytes = 3 * args.image_size * args.image_size
    print(f"bytes per image leaving a worker: uint8 {pixel_bytes:,}, float32 {4 * pixel_bytes:,}")

    loaders = {
        "ours, uint8 out": (mapped, ours(True)),
        "ours, uint8 out, streamed parquet": (streamed, ours(True)),
        "authors' pipeline (restated)": (authors_data, authors_collate),
    }
    worker_rates: dict[str, dict[int, list[float]]] = {name: {w: [] for w in args.workers} for name in loaders}
    worker_cores: dict[str, dict[int, list[float]]] = {name: {w: [] for w in args.workers} for name in loaders}
    if args.workers:
        for _ in range(args.rounds):  # interleaved like the single-core rounds: load changes hit every loader alike
            for name, (dataset, collate) in loaders.items():
                for w in args.workers:
                    rate, cores = time_loader(dataset, collate, args.batch_size, w, args.passes)
                    worker_rates[name][w].append(rate)
                    worker_cores[name][w].append(cores)
        low, high = min(args.workers), max(args.workers)
        print(
            f"\nDataLoader, {args.rounds} round(s) of {args.passes} pass(es) each: images/s and the CPU cores its "
            "workers got (median over rounds)"
        )
        header = " | ".join(f"{w} worker(s): images/s, cores" for w in args.workers)
        print(f"| DataLoader | {header} | scaling {high} vs {low}: median (range) | per-core rate {high} vs {low} |")
        print("|---|" + "---|" * (len(args.workers) + 2))
        for name in loaders:
            cells = [
                f"{statistics.median(worker_rates[name][w]):,.0f}, {statistics.median(worker_cores[name][w]):.2f}"
                for w in args.workers
            ]
            many, few = worker_rates[name][high], worker_rates[name][low]
            many_cores, few_cores = worker_cores[name][high], worker_cores[name][low]
            scaling = [m / f for m, f in zip(many, few)]
            per_core = [(m / mc) / (f / fc) for m, mc, f, fc in zip(many, many_cores, few, few_cores)]
            cells.extend([_range(scaling, 2), _range(per_core, 2)])
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        print(
            "(cores: CPU seconds of the workers over wall seconds. Per-core ratio near 1 with cores below the worker "
            "count: the workers scale with the cores they get and the machine has fewer free cores than workers.)"
        )

    print(f"\nCPU cores to feed one GPU at {args.gpu_images_per_second:g} images/s (median images per CPU second):")
    for name in (ours_name, authors_name, today_name):
        per_core = statistics.median(rates[name])
        print(f"  {name}: {args.gpu_images_per_second / per_core:.2f} cores")
    work.cleanup()
    return {
        "rates": rates,
        "wall_rates": wall_rates,
        "worker_rates": worker_rates,
        "worker_cores": worker_cores,
        "of_floor": of_floor,
    }


if __name__ == "__main__":
    main()
