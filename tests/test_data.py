"""Data modules, the uint8 image cache, subsets, augmentation, models and model cost."""

import shutil

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.io import encode_jpeg, write_png

from lightning_qat.app.data import (
    CIFAR10Data,
    DigitsData,
    EpochSampler,
    ImageFolderData,
    TensorImageDataset,
    balanced_subset,
    image_folder,
)
from lightning_qat.app.models import NIN, ResNetCifar, mobilenet_v2_cifar, resnet20
from lightning_qat.model_stats import count_macs, model_size_bytes
from lightning_qat.prepare import prepare_qat


def test_balanced_subset_is_fixed_balanced_and_seeded():
    labels = torch.arange(10).repeat_interleave(50)
    a = balanced_subset(labels, 100, seed=3)
    assert torch.equal(a, balanced_subset(labels, 100, seed=3))
    assert not torch.equal(a, balanced_subset(labels, 100, seed=4))
    assert torch.bincount(labels[a]).tolist() == [10] * 10
    assert len(a.unique()) == 100
    with pytest.raises(ValueError, match="exceeds"):
        balanced_subset(labels, 501)


def test_augmentation_crops_with_padding_and_flips():
    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).reshape(1, 3, 4, 4)
    plain = TensorImageDataset(image, torch.tensor([0]), (0, 0, 0), (1, 1, 1))
    x, _ = plain[0]
    assert torch.allclose(x * 255, image[0].float())
    augmented = TensorImageDataset(image, torch.tensor([0]), (0, 0, 0), (1, 1, 1), 2, True)
    torch.manual_seed(0)
    seen = {tuple((augmented[0][0] * 255).round().flatten().tolist()) for _ in range(60)}
    assert len(seen) > 10  # many crops and flips
    for sample in seen:  # each is a shifted (and maybe flipped) window, zero padded
        assert set(sample) <= set(image.flatten().tolist()) | {0}


def test_digits_datamodule_splits_and_normalises():
    dm = DigitsData(batch_size=32)
    dm.setup()
    assert len(dm.train_set) == 1437 and len(dm.test_set) == 360
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    assert abs(float(x.mean())) < 0.3


def test_validation_split_is_held_out_of_training():
    dm = DigitsData(val_size=100, train_subset=500)
    dm.setup()
    assert len(dm.val_set) == 100 and len(dm.train_set) == 500
    train = {tuple(img.flatten().tolist()) for img in dm.train_set.images}
    val = [tuple(img.flatten().tolist()) for img in dm.val_set.images]
    assert sum(v in train for v in val) < 5  # (the digits have a few duplicate images)


def make_folder(root, n_per_class=3, classes=("cat", "dog")):
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n_per_class):
                image = torch.full((3, 32, 32), 40 * c + i, dtype=torch.uint8)
                write_png(image, str(root / split / name / f"{i}.png"))


def test_image_folder_decodes_once_into_a_cache(tmp_path, monkeypatch):
    make_folder(tmp_path / "set")
    dm = ImageFolderData(
        str(tmp_path / "set"), cache_dir=str(tmp_path / "cache"), batch_size=4, augment=False
    )
    dm.setup()
    assert len(dm.train_set) == 6 and dm.train_set.images.dtype == torch.uint8
    assert dm.train_set.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert dm.train_set.images[4, 0, 0, 0] == 41
    caches = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(caches) == 2 and all(c.endswith(".pt") for c in caches)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_folder, "decode_image", no_decoding)
    again = ImageFolderData(str(tmp_path / "set"), cache_dir=str(tmp_path / "cache"))
    again.setup()  # the folder is unchanged: the second load reads the cache only
    assert torch.equal(again.train_set.images, dm.train_set.images)


def test_an_edited_folder_is_decoded_again(tmp_path):
    """main keyed the cache on the path: a deleted class was still counted."""
    make_folder(tmp_path / "set", classes=("cat", "dog", "eel"))
    first = ImageFolderData(str(tmp_path / "set"), cache_dir=str(tmp_path / "cache"))
    first.setup()
    assert len(first.train_set) == 9
    for split in ("train", "test"):
        shutil.rmtree(tmp_path / "set" / split / "eel")
    (tmp_path / "set" / "train" / "dog" / "0.png").unlink()
    edited = ImageFolderData(str(tmp_path / "set"), cache_dir=str(tmp_path / "cache"))
    edited.setup()
    assert edited.train_set.labels.tolist() == [0, 0, 0, 1, 1]
    assert len(edited.test_set) == 6
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the stale caches are gone


def test_a_test_split_with_other_classes_is_refused(tmp_path):
    """Each split numbering its own folders shifted every later test label silently."""
    make_folder(tmp_path / "set", classes=("cat", "dog", "eel"))
    shutil.rmtree(tmp_path / "set" / "test" / "dog")
    with pytest.raises(ValueError, match=r"only in train/: \['dog'\]; only in test/: none"):
        ImageFolderData(str(tmp_path / "set"), cache_dir=str(tmp_path / "cache")).setup()


def test_a_truncated_jpeg_is_named(tmp_path):
    make_folder(tmp_path / "set")
    bad = tmp_path / "set" / "train" / "dog" / "broken.jpg"
    data = encode_jpeg(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)).numpy().tobytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"broken\.jpg: cannot decode the image"):
        ImageFolderData(str(tmp_path / "set"), cache_dir=str(tmp_path / "cache")).setup()


def test_image_folder_missing_split_says_what_layout_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/ and test/ folders"):
        ImageFolderData(str(tmp_path)).setup()


def test_cifar10_offline_without_a_copy_says_how_to_point_at_one(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(urllib.request.OpenerDirector, "open", offline)
    dm = CIFAR10Data(data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"data\.data_dir.*data=cifar10_folder"):
        dm.prepare_data()


def test_cifar10_reads_torchvisions_copy_without_download(tmp_path, monkeypatch):
    import torchvision

    class FakeCIFAR:
        def __init__(self, root, train, download):
            assert download is False
            self.data = torch.randint(
                0, 255, (4 if train else 2, 32, 32, 3), dtype=torch.uint8
            ).numpy()
            self.targets = [0, 1, 2, 3][: 4 if train else 2]

    monkeypatch.setattr(CIFAR10Data, "dataset_class", FakeCIFAR)
    dm = CIFAR10Data(data_dir=str(tmp_path), download=False, batch_size=2)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32)
    assert torchvision  # the real class is torchvision.datasets.CIFAR10


def test_nin_matches_the_reference_layout():
    model = NIN()
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [192, 160, 96, 192, 192, 192, 192, 192, 10]
    assert [c.kernel_size[0] for c in convs] == [5, 1, 1, 5, 1, 1, 3, 1, 1]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 2
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_and_mobilenet_for_cifar():
    assert sum(p.numel() for p in resnet20().parameters()) == pytest.approx(272_474, rel=0.01)
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNetCifar(depth=21)
    mobile = mobilenet_v2_cifar()
    features = mobile.features(torch.zeros(1, 3, 32, 32))
    assert features.shape[-2:] == (4, 4)


def test_macs_and_sizes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    assert count_macs(model, torch.zeros(1, 3, 4, 4)) == 3 * 9 * 8 * 16 + 128 * 10
    params = sum(p.numel() for p in model.parameters())
    assert model_size_bytes(model) == 4 * params
    prepare_qat(model)
    int_size = model_size_bytes(model, quantized=True)
    # int8 weights, int32 biases, a float scale and int zero point per output channel
    assert int_size == (8 * 27 + 10 * 128) + 4 * (8 + 10) + 8 * (8 + 10)


def test_an_epochs_batches_depend_on_seed_and_epoch_only():
    """The same batches with or without (persistent) workers, in any process: what makes
    a resumed run exact. Epochs and seeds differ from each other."""
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    dataset = TensorImageDataset(
        images, torch.arange(40) % 10, (0.5,) * 3, (0.5,) * 3, crop_padding=2, flip=True, seed=3
    )

    def epoch_batches(epoch: int, workers: int, seed: int = 3) -> list[torch.Tensor]:
        dataset.seed = seed
        sampler = EpochSampler(dataset, seed=seed)
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=workers)
        torch.manual_seed(epoch + 100)  # the global RNG plays no part
        return [torch.cat([x.flatten(1), y[:, None].float()], 1) for x, y in loader]

    reference = epoch_batches(1, workers=0)
    assert all(torch.equal(a, b) for a, b in zip(reference, epoch_batches(1, 2), strict=True))
    assert not torch.equal(torch.cat(reference), torch.cat(epoch_batches(2, 0)))
    assert not torch.equal(torch.cat(reference), torch.cat(epoch_batches(1, 0, seed=4)))
    # every image once per epoch, and crops/flips actually vary
    labels = torch.cat(reference)[:, -1]
    assert sorted(labels.tolist()) == sorted((torch.arange(40) % 10).float().tolist())
    assert len({dataset[(0, epoch)][0].sum().item() for epoch in range(8)}) > 1
