"""The validation split (issue 32): disjoint from train and test by pixels, and train and test unchanged where it
is generated beside them."""

from __future__ import annotations

from pathlib import Path

from medcomp import data
from medcomp.params import load_params
from medcomp.synthetic import generate_dermnet_like


def _params(tmp_path: Path, **data_overrides):
    return load_params("embedded", {"data": {"synthetic": {"train_per_disease": 3, "test_per_disease": 2, "image_size": 32}, "test_images": 16,
                                             **data_overrides}, "runtime": {"cache_dir": str(tmp_path / "cache")}})


def test_a_generated_validation_split_leaves_train_and_test_as_they_were(tmp_path):
    without = data.prepare_dataset(_params(tmp_path, validation_per_disease=0))
    with_validation = data.prepare_dataset(_params(tmp_path, validation_per_disease=2))
    assert without.validation == [] and len(with_validation.validation_images) == 2 * 8
    pixels = lambda images: [data.pixel_hash(i.path) for i in images]  # noqa: E731
    assert pixels(without.train_images) == pixels(with_validation.train_images)  # the same pictures: published bits stay
    assert pixels(without.test_images) == pixels(with_validation.test_images)
    assert not set(pixels(with_validation.validation_images)) & set(pixels(with_validation.train_images) + pixels(with_validation.test_images))
    assert {i.split for i in with_validation.validation_images} == {"validation"} and len(with_validation.validation) == 2 * 8 * 3


def test_without_a_validation_folder_it_is_held_out_of_train_and_repeated_pictures_are_dropped(tmp_path):
    from medcomp.knowledge import DISEASES_BY_SLUG

    root = generate_dermnet_like(tmp_path / "dermnet", train_per_disease=4, test_per_disease=1, image_size=32, seed=3)
    scan = data.scan_dermnet(root, tuple(DISEASES_BY_SLUG))
    train, test = data.select_split(scan.images, "train"), data.select_split(scan.images, "test")
    validation, kept_train, dropped = data.validation_split(scan, train, test, 2, seed=0)
    assert len(validation) == 2 * 8 and dropped == 0 and {i.split for i in validation} == {"train"}
    assert not {i.path for i in validation} & {i.path for i in kept_train} and len(kept_train) == len(train) - 2 * 8
    # a train file repeating a test image's pixels, under another name, is never a validation image
    copy = Path(train[0].path).with_name("renamed.jpg")
    copy.write_bytes(Path(next(i for i in test if i.disease == train[0].disease).path).read_bytes())
    with_copy = [data.LabelledImage(str(copy), train[0].disease, "train"), *train]
    validation, _, dropped = data.validation_split(scan, with_copy, test, 5, seed=0)  # 5 of a disease's 5: the copy is chosen
    assert dropped == 1 and str(copy) not in {i.path for i in validation} and len(validation) == 4 * 7 + 4  # 4 a disease; 5 - 1 for the copy's
