"""dsrna.data: the shipped MNIST subset, and every on-disk format written in miniature and read back
through the real loaders."""

import collections
import importlib.util
import pickle
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsrna.data import (
    DATASETS,
    Cutout,
    class_balanced_split,
    class_balanced_subset,
    dataset_info,
    dataset_targets,
    get_dataset,
    make_loader,
    search_split,
)
from dsrna.data import sources
from dsrna.errors import DataError, first_line

REPO = Path(__file__).resolve().parents[1]

# --- writers of the on-disk formats ----------------------------------------------------------------


def write_idx(path, array: np.ndarray) -> None:
    """IDX (LeCun's format): magic 0x0000 08 <ndim> for unsigned bytes, big-endian dimensions, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_layout(root, folder, rng, n_train=6, n_test=4):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
        "t10k": (rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test)),
    }
    for prefix, (images, labels) in arrays.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return arrays


def write_cifar_layout(root, rng, per_batch=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as file:
            pickle.dump({"batch_label": name, "labels": labels, "data": data}, file, protocol=2)
        written[name] = (data, labels)
    return written


def write_image_folder(root, classes=("n01", "n02", "n03"), per_class=None):
    per_class = per_class or {"train": 4, "val": 2}
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for wnid in classes:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (20 + 3 * i, 30, 3)).astype(np.uint8)
                # Both formats ImageNet mirrors come in; ImageFolder decodes by content.
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.{'JPEG' if i % 2 else 'png'}")


# --- the shipped subset ------------------------------------------------------------------------------


def test_mnist_mini_sizes_range_and_balance():
    train, test = get_dataset("mnist-mini"), get_dataset("mnist-mini", train=False)
    assert (len(train), len(test)) == (4000, 1000)
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and isinstance(label, int)
    assert torch.equal(torch.bincount(dataset_targets(train)), torch.full((10,), 400))
    assert torch.equal(torch.bincount(dataset_targets(test)), torch.full((10,), 100))
    pixels = train.images.float() / 255
    assert pixels.min() == 0 and pixels.max() == 1
    # Real handwritten digits, not noise: the pixel statistics of MNIST.
    assert abs(pixels.mean().item() - 0.1307) < 0.005 and abs(pixels.std().item() - 0.3081) < 0.005


def test_mnist_mini_is_the_default_and_independent_of_root(tmp_path):
    assert torch.equal(get_dataset().images, get_dataset("mnist-mini", root=tmp_path / "absent").images)


def test_mnist_mini_corruption_is_detected(tmp_path, monkeypatch):
    damaged = tmp_path / "mnist_mini.npz"
    payload = bytearray(sources.MNIST_MINI_PATH.read_bytes())
    payload[1000] ^= 0xFF
    damaged.write_bytes(bytes(payload))
    monkeypatch.setattr(sources, "MNIST_MINI_PATH", damaged)
    sources._mnist_mini_arrays.cache_clear()
    try:
        with pytest.raises(DataError, match="corrupted .*sha256"):
            get_dataset("mnist-mini")
    finally:
        sources._mnist_mini_arrays.cache_clear()


# --- MNIST and Fashion-MNIST from IDX files ----------------------------------------------------------


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_files_load_exactly(tmp_path, name, folder):
    arrays = write_mnist_layout(tmp_path, folder, np.random.default_rng(1))
    for train, prefix in ((True, "train"), (False, "t10k")):
        dataset = get_dataset(name, root=tmp_path, train=train)
        images, labels = arrays[prefix]
        assert len(dataset) == len(labels)
        for i in (0, len(labels) - 1):
            image, label = dataset[i]
            assert image.shape == (1, 28, 28)
            torch.testing.assert_close(image[0], torch.from_numpy(images[i] / 255).float())
            assert label == labels[i]


def test_mnist_missing_root_names_the_layout(tmp_path):
    with pytest.raises(DataError, match=r"MNIST not found: expected .*train-images-idx3-ubyte.* in .*MNIST/raw \(no such folder\); get them"):
        get_dataset("mnist", root=tmp_path / "nowhere")


def test_mnist_wrong_layout_and_missing_file(tmp_path):
    write_mnist_layout(tmp_path, "MNIST", np.random.default_rng(2))
    flat = tmp_path / "flat"
    shutil.copytree(tmp_path / "MNIST" / "raw", flat)  # files directly under ROOT: not the torchvision layout
    with pytest.raises(DataError, match="MNIST/raw"):
        get_dataset("mnist", root=flat)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing: t10k-labels-idx1-ubyte\)"):
        get_dataset("mnist", root=tmp_path)


def test_mnist_malformed_file(tmp_path):
    write_mnist_layout(tmp_path, "MNIST", np.random.default_rng(3))
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"not an idx file at all")
    with pytest.raises(DataError, match="malformed IDX files"):
        get_dataset("mnist", root=tmp_path)


# --- CIFAR-10 python batches -------------------------------------------------------------------------


def test_cifar10_batches_load_exactly(tmp_path):
    written = write_cifar_layout(tmp_path, np.random.default_rng(4))
    train, test = get_dataset("cifar10", root=tmp_path), get_dataset("cifar10", root=tmp_path, train=False)
    assert (len(train), len(test)) == (10, 2)
    data, labels = written["data_batch_3"]
    image, label = train[5]  # second image of the third batch
    assert image.shape == (3, 32, 32) and label == labels[1]
    # A row holds the red, green and blue planes one after the other, each row-major.
    torch.testing.assert_close(image, torch.from_numpy(data[1].reshape(3, 32, 32) / 255).float())
    assert dataset_targets(test).tolist() == written["test_batch"][1]


def test_cifar10_missing_batch(tmp_path):
    write_cifar_layout(tmp_path, np.random.default_rng(5))
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match=r"CIFAR-10 not found: .*\(missing: test_batch\); download cifar-10-python"):
        get_dataset("cifar10", root=tmp_path)


def test_mnist_refuses_images_of_another_size(tmp_path):
    """Valid IDX files of 32x32 images (another data set's) are not read as MNIST."""
    write_mnist_layout(tmp_path, "MNIST", np.random.default_rng(12))
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte", np.zeros((4, 32, 32)))
    with pytest.raises(DataError, match=r"expected uint8 28x28 images, found torch.uint8 \(4, 32, 32\)"):
        get_dataset("mnist", root=tmp_path, train=False)


def test_cifar10_refuses_foreign_pickles_and_bad_shapes(tmp_path):
    write_cifar_layout(tmp_path, np.random.default_rng(6))
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as file:  # a pickle that names a class outside numpy
        pickle.dump(collections.OrderedDict(data=np.zeros((1, 3072), np.uint8), labels=[0]), file)
    with pytest.raises(DataError, match="data_batch_1 is not a CIFAR-10 python batch .*refusing to load collections.OrderedDict"):
        get_dataset("cifar10", root=tmp_path)
    with open(batch, "wb") as file:
        pickle.dump({"data": np.zeros((1, 1024), np.uint8), "labels": [0]}, file)
    with pytest.raises(DataError, match=r"expected uint8 data of shape \[N, 3072\]"):
        get_dataset("cifar10", root=tmp_path)


# --- ImageNet ImageFolder -------------------------------------------------------------------------


def test_imagenet_folder_pipelines_and_subset(tmp_path):
    write_image_folder(tmp_path)
    train = get_dataset("imagenet", root=tmp_path)
    val = get_dataset("imagenet", root=tmp_path, train=False)
    assert (len(train), len(val)) == (12, 6) and train.classes == ["n01", "n02", "n03"]
    for dataset in (train, val, get_dataset("imagenet", root=tmp_path, augment=True)):
        image, label = dataset[len(dataset) - 1]
        assert image.shape == (3, 224, 224) and 0 <= image.min() and image.max() <= 1 and label == 2
    subset = get_dataset("imagenet", root=tmp_path, subset_fraction=0.5, seed=1)
    assert torch.equal(torch.bincount(dataset_targets(subset)), torch.tensor([2, 2, 2]))
    assert subset.indices == get_dataset("imagenet", root=tmp_path, subset_fraction=0.5, seed=1).indices


def test_imagenet_layout_errors(tmp_path):
    with pytest.raises(DataError, match=r"ImageNet not found: .*train is not a folder; expected ROOT/train/<wnid>/\*.JPEG"):
        get_dataset("imagenet", root=tmp_path)
    write_image_folder(tmp_path)
    shutil.rmtree(tmp_path / "val" / "n02")
    with pytest.raises(DataError, match=r"different class folders \(1 differ, e.g. n02\)"):
        get_dataset("imagenet", root=tmp_path, train=False)
    (tmp_path / "val" / "n02").mkdir()  # a class folder without images
    with pytest.raises(DataError, match="n02"):
        get_dataset("imagenet", root=tmp_path, train=False)


def test_unreadable_image_is_named_also_from_a_loader_worker(tmp_path):
    write_image_folder(tmp_path)
    broken = tmp_path / "train" / "n02" / "n02_1.JPEG"
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated download
    train = get_dataset("imagenet", root=tmp_path)
    index = train.imgs.index((str(broken), 1))
    with pytest.raises(DataError, match=r"n02_1.JPEG: not a readable image \(OSError"):
        train[index]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train, [index]), num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    # what the CLI prints: the worker's message, not "Caught DataError in DataLoader worker process 0."
    assert first_line(caught.value).startswith(f"{broken}: not a readable image (OSError")


def test_evaluation_limit_covers_every_class_of_a_sorted_split(tmp_path):
    from dsrna.evaluation.common import evaluation_loader

    write_image_folder(tmp_path, per_class={"train": 1, "val": 4})  # val sorted by class: 4 x n01, 4 x n02, ...
    labels = torch.cat([y for _, y in evaluation_loader("imagenet", tmp_path, limit=6, batch_size=6)])
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    # a split in no class order (MNIST's test set) keeps its first images
    first = torch.cat([y for _, y in evaluation_loader("mnist-mini", limit=5, batch_size=5)])
    assert first.tolist() == get_dataset("mnist-mini", train=False).targets[:5].tolist()


def test_imagenet_class_count(tmp_path):
    write_image_folder(tmp_path)
    with pytest.warns(UserWarning, match="has 3 class folders, not ImageNet's 1000: .* the last 997 never get a label"):
        get_dataset("imagenet", root=tmp_path)
    for split in ("train", "val"):
        for i in range(1001):
            (tmp_path / split / f"m{i:04d}").mkdir()
    with pytest.raises(DataError, match="has 1004 class folders; ImageNet has 1000"):
        get_dataset("imagenet", root=tmp_path)


# --- names, info, transforms ----------------------------------------------------------------------


def test_unknown_name_and_info():
    with pytest.raises(DataError, match="unknown data set 'svhn'; choose one of mnist-mini, mnist"):
        get_dataset("svhn")
    assert set(DATASETS) == {"mnist-mini", "mnist", "fashion-mnist", "cifar10", "imagenet"}
    cifar = dataset_info("cifar10")
    assert (cifar.num_classes, cifar.in_channels, cifar.image_size, len(cifar.mean), len(cifar.std)) == (10, 3, 32, 3, 3)
    assert dataset_info("mnist-mini").in_channels == 1 and dataset_info("imagenet").image_size == 224


def test_augmentation_is_for_training_only_and_keeps_shape(tmp_path):
    with pytest.raises(ValueError, match="training data only"):
        get_dataset("mnist-mini", train=False, augment=True)
    write_cifar_layout(tmp_path, np.random.default_rng(7))
    plain = get_dataset("cifar10", root=tmp_path)
    augmented = get_dataset("cifar10", root=tmp_path, augment=True, cutout=16)
    torch.manual_seed(0)
    images = torch.stack([augmented[0][0] for _ in range(8)])
    assert images.shape == (8, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert not all(torch.equal(image, plain[0][0]) for image in images)


def test_cutout_square_clipped_at_border_with_mean_fill():
    cutout = Cutout(4, fill=(0.25, 0.5))
    torch.manual_seed(0)
    for _ in range(20):
        image = torch.ones(2, 9, 7)
        out = cutout(image)
        assert torch.equal(image, torch.ones(2, 9, 7))  # the input is left alone
        changed = (out != 1).all(dim=0)
        rows, cols = changed.any(dim=1).sum().item(), changed.any(dim=0).sum().item()
        assert 2 <= rows <= 4 and 2 <= cols <= 4 and changed.sum() == rows * cols
        assert set(out[0][changed].tolist()) == {0.25} and set(out[1][changed].tolist()) == {0.5}


# --- splitting and loading -------------------------------------------------------------------------


def test_search_split_is_disjoint_complete_and_seeded():
    dataset = get_dataset("mnist-mini", train=False)
    first, second = search_split(dataset, portion=0.3, seed=5)
    assert (len(first), len(second)) == (300, 700)
    assert set(first.indices).isdisjoint(second.indices)
    assert sorted(first.indices + second.indices) == list(range(1000))
    assert search_split(dataset, 0.3, seed=5)[0].indices == first.indices
    assert search_split(dataset, 0.3, seed=6)[0].indices != first.indices
    for portion in (0.0, 1.0, 0.0001):
        with pytest.raises(ValueError, match="portion"):
            search_split(dataset, portion)


def test_class_balanced_subset_counts():
    dataset = get_dataset("mnist-mini", train=False)
    subset = class_balanced_subset(dataset, 0.25, seed=3)
    assert torch.equal(torch.bincount(dataset_targets(subset)), torch.full((10,), 25))
    assert subset.indices == sorted(subset.indices)
    with pytest.raises(ValueError, match="fraction"):
        class_balanced_subset(dataset, 1.5)
    # A fraction too small for a class still keeps one image of it: no class disappears.
    assert torch.equal(torch.bincount(dataset_targets(class_balanced_subset(dataset, 0.001)), minlength=10),
                       torch.ones(10, dtype=torch.long))


def test_augmentation_and_cutout_are_refused_on_test_data():
    for options in (dict(augment=True), dict(cutout=8)):
        with pytest.raises(ValueError, match="apply to training data only"):
            get_dataset("mnist-mini", train=False, **options)


def test_search_data_with_subset_fractions_draws_each_half_per_class():
    """PC-DARTS' halves are per-class draws of each fraction (one pool cut at random was not)."""
    from dsrna.search import SearchConfig
    from dsrna.search.loop import load_search_data

    data = load_search_data(SearchConfig(subset_fractions=(0.1, 0.025)))  # mnist-mini: 400 images per class
    assert torch.equal(torch.bincount(dataset_targets(data.train)), torch.full((10,), 40))
    assert torch.equal(torch.bincount(dataset_targets(data.val)), torch.full((10,), 10))


def test_search_split_sizes_survive_floating_point():
    weights_half, _ = search_split(torch.utils.data.TensorDataset(torch.zeros(50000)), 0.29)
    assert len(weights_half) == 14500  # int(0.29 * 50000) is 14499


def test_class_balanced_split_is_disjoint_per_class_and_seeded():
    dataset = get_dataset("mnist-mini", train=False)
    weights_part, arch_part = class_balanced_split(dataset, (0.1, 0.025), seed=2)  # the PC-DARTS proportions
    assert torch.equal(torch.bincount(dataset_targets(weights_part)), torch.full((10,), 10))
    assert torch.equal(torch.bincount(dataset_targets(arch_part)), torch.full((10,), 2))  # round(2.5) = 2
    assert set(weights_part.indices).isdisjoint(arch_part.indices)
    assert class_balanced_split(dataset, (0.1, 0.025), seed=2)[1].indices == arch_part.indices
    assert class_balanced_split(dataset, (0.1, 0.025), seed=3)[1].indices != arch_part.indices
    with pytest.raises(ValueError, match="sum to at most 1"):
        class_balanced_split(dataset, (0.6, 0.5))


def test_make_loader_order_depends_only_on_seed():
    dataset = search_split(get_dataset("mnist-mini", train=False), 0.5, seed=0)[1]

    def labels(seed):
        return torch.cat([y for _, y in make_loader(dataset, 64, shuffle=True, seed=seed, drop_last=True)])

    torch.manual_seed(123)
    first = labels(1)
    torch.manual_seed(456)  # the global generator must not matter
    assert torch.equal(first, labels(1)) and not torch.equal(first, labels(2))
    assert first.numel() == 448  # 500 // 64 full batches
    x, y = next(iter(make_loader(dataset, 8)))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64
    with pytest.raises(ValueError, match="sampler"):
        make_loader(dataset, 8, shuffle=True, sampler=torch.utils.data.SequentialSampler(dataset))


# --- the script that rebuilt the shipped subset ------------------------------------------------------


def test_subset_script_is_balanced_and_byte_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("make_mnist_mini", REPO / "tools" / "make_mnist_mini.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rng = np.random.default_rng(8)
    fake_mnist = {  # stands in for the 70,000 images of the wheel: 450 training and 120 test images per class
        "train_images": rng.integers(0, 256, (4500, 28, 28), dtype=np.uint8), "train_labels": np.arange(4500) % 10,
        "test_images": rng.integers(0, 256, (1200, 28, 28), dtype=np.uint8), "test_labels": np.arange(1200) % 10,
    }
    subset = script.make_subset(fake_mnist)
    assert np.array_equal(np.bincount(subset["train_labels"]), np.full(10, script.TRAIN_PER_CLASS))
    assert np.array_equal(np.bincount(subset["test_labels"]), np.full(10, script.TEST_PER_CLASS))
    source = subset["test_source_index"]
    assert np.all(np.diff(source) > 0) and np.array_equal(subset["test_images"], fake_mnist["test_images"][source])
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    script.write_reproducible_npz(first, subset)
    script.write_reproducible_npz(second, script.make_subset(fake_mnist))
    assert first.read_bytes() == second.read_bytes()
    with np.load(first, allow_pickle=False) as archive:
        assert all(np.array_equal(archive[key], value) for key, value in subset.items())


def test_augmentation_recipes():
    """DARTS' CIFAR-10 recipe (crop with 4 pixels of padding, flips) and the MNIST family's (crop with
    2 pixels, no flips: digits have a handedness)."""
    import torchvision.transforms as T

    from dsrna.data.transforms import small_image_augmentation

    cifar, mnist = small_image_augmentation("cifar", 32), small_image_augmentation("mnist", 28)
    assert [type(t) for t in cifar] == [T.RandomCrop, T.RandomHorizontalFlip] and cifar[0].padding == 4
    assert [type(t) for t in mnist] == [T.RandomCrop] and mnist[0].padding == 2


def test_class_balanced_split_rounds_per_class():
    """round(f * n_c) per class, not floor: 2.75 items of a class of 100 at 2.75% are 3."""
    class Labels(torch.utils.data.Dataset):
        targets = torch.arange(200) % 2

        def __len__(self):
            return 200

    small, = class_balanced_split(Labels(), [0.0275], seed=0)
    assert torch.equal(torch.bincount(dataset_targets(small)), torch.tensor([3, 3]))


def test_cutout_fills_with_the_data_sets_mean(tmp_path):
    write_cifar_layout(tmp_path, np.random.default_rng(8))
    data = get_dataset("cifar10", root=tmp_path, augment=True, cutout=8)
    cut = next(t for t in data.transform.transforms if isinstance(t, Cutout))
    torch.testing.assert_close(cut.fill.flatten(), torch.tensor(dataset_info("cifar10").mean, dtype=cut.fill.dtype))


def test_imagenet_with_exactly_its_classes_is_read_and_renamed_val_folders_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "IMAGENET_CLASSES", 2)  # a real ImageNet has exactly 1,000 folders
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "x.JPEG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(sources.read_imagenet(tmp_path, True, None)) == 2
    (tmp_path / "val" / "b").rename(tmp_path / "val" / "c")  # same count, other names: labels would not match
    with pytest.raises(DataError, match="different class folders"):
        sources.read_imagenet(tmp_path, True, None)


def test_an_explicit_data_root_beats_the_environment(monkeypatch):
    from dsrna.data.registry import DATA_ROOT_ENV, data_root

    monkeypatch.setenv(DATA_ROOT_ENV, "/elsewhere")
    assert data_root("given") == Path("given") and data_root(None) == Path("/elsewhere")


# --- what the recipes and constants are, as get_dataset builds them ---------------------------------


def test_normalisation_constants_are_the_training_sets_statistics():
    """The published per-channel statistics (a swapped channel or a typo would pass every shape test);
    the shipped MNIST sample's own pixels agree with MNIST's to the third decimal."""
    expected = {"mnist": ((0.1307,), (0.3081,)), "fashion-mnist": ((0.2860,), (0.3530,)),
                "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
    for name, (mean, std) in expected.items():
        assert (dataset_info(name).mean, dataset_info(name).std) == (mean, std), name
    mini = get_dataset("mnist-mini")
    pixels = mini.images.double() / 255
    assert abs(pixels.mean().item() - dataset_info("mnist-mini").mean[0]) < 2e-3
    assert abs(pixels.std().item() - dataset_info("mnist-mini").std[0]) < 2e-3


def test_mnist_mini_labels_belong_to_their_images():
    """A nearest-class-mean classifier fitted on the training split gets 81% of the test split (10%
    if images and labels were shuffled apart)."""
    train, test = get_dataset("mnist-mini"), get_dataset("mnist-mini", train=False)
    flat = train.images.double().flatten(1)
    means = torch.stack([flat[train.targets == c].mean(0) for c in range(10)])
    predicted = torch.cdist(test.images.double().flatten(1), means).argmin(1)
    assert (predicted == test.targets).double().mean() > 0.75


def _transform_types(dataset) -> list[type]:
    transform = dataset.transform
    return [type(t) for t in getattr(transform, "transforms", [transform])]


def test_get_dataset_applies_each_data_sets_recipe(tmp_path, monkeypatch):
    import torchvision.transforms as T

    monkeypatch.setattr(sources, "IMAGENET_CLASSES", 3)  # the miniature ImageNet's class count

    write_cifar_layout(tmp_path / "c", np.random.default_rng(9))
    cifar = get_dataset("cifar10", root=tmp_path / "c", augment=True)
    assert _transform_types(cifar) == [T.RandomCrop, T.RandomHorizontalFlip] and cifar.transform.transforms[0].padding == 4
    mnist = get_dataset("mnist-mini", augment=True)
    assert _transform_types(mnist) == [T.RandomCrop] and mnist.transform.padding == 2
    assert get_dataset("mnist-mini").transform is None

    write_image_folder(tmp_path / "i")
    train = get_dataset("imagenet", root=tmp_path / "i", augment=True)
    assert _transform_types(train) == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ColorJitter, T.ToTensor]
    jitter = train.transform.transforms[2]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4),) * 3 + ((-0.2, 0.2),)
    val = get_dataset("imagenet", root=tmp_path / "i", train=False)
    assert _transform_types(val) == [T.Resize, T.CenterCrop, T.ToTensor]
    # Evaluation images are the same whatever the random state.
    torch.manual_seed(1)
    first = val[3][0]
    torch.manual_seed(2)
    assert torch.equal(first, val[3][0])


def test_imagenet_without_its_val_folder_says_so(tmp_path):
    write_image_folder(tmp_path)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError, match=r"ImageNet not found: .*val is not a folder"):
        get_dataset("imagenet", root=tmp_path)


@pytest.mark.parametrize("labels,rows,message", [
    ([3, 10], 2, r"test_batch: labels outside 0..9"),  # a label equal to the class count
    ([-1, 3], 2, r"test_batch: labels outside 0..9"),
    ([], 0, r"test_batch: no images"),  # an error, not an empty data set
    ([1, 2, 3], 2, r"test_batch: 2 images but 3 labels"),  # named per batch: later labels would shift
])
def test_cifar10_refuses_a_bad_batch_by_its_name(tmp_path, labels, rows, message):
    write_cifar_layout(tmp_path, np.random.default_rng(9))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as file:
        pickle.dump({"batch_label": "test_batch", "labels": labels, "data": np.zeros((rows, 3072), np.uint8)}, file)
    with pytest.raises(DataError, match=message):
        get_dataset("cifar10", root=tmp_path, train=False)


def test_subset_fraction_draws_with_its_seed():
    draws = [get_dataset("mnist-mini", subset_fraction=0.1, seed=seed).indices for seed in (1, 1, 2)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
