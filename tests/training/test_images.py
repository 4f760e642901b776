"""Unreadable images: checked once per split up front, skipped and counted, or refused."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from emomerge.merging.errors import InputError
from emomerge.training.data.sample import Sample, placeholder_image, user_message
from emomerge.training.models.batching import MAX_BAD_IMAGE_SHARE, check_images, rgb_images


def _jpeg_bytes(seed: int) -> bytes:
    img = Image.effect_noise((48, 48), 40 + seed).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sample(i: int, images: list) -> Sample:
    return Sample(
        id=f"s{i}",
        images=images,
        messages=user_message(len(images), "?"),
        target="Joy",
        labels=["Joy"],
        label_set=["Joy"],
        group=f"s{i}",
    )


def _files(tmp_path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        path = tmp_path / f"img{i:02d}.jpg"
        path.write_bytes(_jpeg_bytes(i))
        paths.append(str(path))
    return paths


# Each way a file goes bad: not an image, an empty file, a JPEG cut in half (its header still
# parses: only decoding finds it), a PNG whose data fails its checksum.
def _not_an_image(path):
    path.write_bytes(b"this is not an image")


def _empty(path):
    path.write_bytes(b"")


def _truncated_jpeg(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_png_crc(path):
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 50).convert("RGB").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # a flipped byte inside the compressed pixels
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "corrupt",
    [_not_an_image, _empty, _truncated_jpeg, _bad_png_crc],
    ids=["not_an_image", "empty", "truncated_jpeg", "bad_png_crc"],
)
def test_a_bad_file_is_skipped_with_its_samples_and_counted_once(tmp_path, corrupt):
    paths = _files(tmp_path, 20)
    corrupt(tmp_path / "img03.jpg")
    # Two samples share the bad file (EmoComics35 utterances share their page): one file.
    samples = [_sample(i, [p]) for i, p in enumerate(paths)] + [_sample(99, [paths[3]])]
    with pytest.warns(
        UserWarning, match=r"stage x: skipped 1 unreadable image files \(2 samples\)"
    ):
        kept, skipped = check_images(samples, where="stage x")
    assert skipped == 1
    assert [s.id for s in kept] == [f"s{i}" for i in range(20) if i != 3]


def test_a_clean_split_is_returned_whole(tmp_path):
    samples = [_sample(i, [p]) for i, p in enumerate(_files(tmp_path, 5))]
    samples.append(_sample(5, [placeholder_image()]))  # decoded in memory: nothing to check
    kept, skipped = check_images(samples)
    assert skipped == 0 and kept == samples


def test_a_sample_with_one_bad_image_of_two_is_dropped(tmp_path):
    a, b, c = _files(tmp_path, 3)
    _not_an_image(tmp_path / "img01.jpg")
    with pytest.warns(UserWarning, match=r"\(1 samples\)"):
        kept, skipped = check_images([_sample(0, [a, b]), _sample(1, [a, c])], max_bad_share=0.5)
    assert skipped == 1 and [s.id for s in kept] == ["s1"]


@pytest.mark.parametrize(
    "n_bad,share,refused",
    [
        (1, MAX_BAD_IMAGE_SHARE, False),  # 1 of 20 = 5 %: not more than the share
        (2, MAX_BAD_IMAGE_SHARE, True),  # 2 of 20 = 10 %
        (2, 0.1, False),
        (1, 0.0, True),  # no bad file allowed
    ],
)
def test_the_share_of_unreadable_files_decides(tmp_path, n_bad, share, refused):
    paths = _files(tmp_path, 20)
    for i in range(n_bad):
        _not_an_image(tmp_path / f"img{i:02d}.jpg")
    samples = [_sample(i, [p]) for i, p in enumerate(paths)]
    if refused:
        with pytest.raises(InputError) as exc:
            check_images(samples, max_bad_share=share, where="cur.yaml: stages.0 (emoart)")
        text = str(exc.value)
        assert text.startswith(
            f"cur.yaml: stages.0 (emoart): {n_bad} of 20 image files "
            f"unreadable ({n_bad / 20:.1%}, more than max_bad_image_share "
            f"{share:g}); e.g. {paths[0]} ("
        )
        assert "\n" not in text
    else:
        with pytest.warns(UserWarning):
            kept, skipped = check_images(samples, max_bad_share=share)
        assert skipped == n_bad and len(kept) == 20 - n_bad


def test_a_split_whose_images_are_all_unreadable_is_refused_whatever_the_share(tmp_path):
    paths = _files(tmp_path, 3)
    for i in range(3):
        _empty(tmp_path / f"img{i:02d}.jpg")
    with pytest.raises(InputError, match=r"^split: 3 of 3 image files unreadable"):
        check_images(
            [_sample(i, [p]) for i, p in enumerate(paths)], max_bad_share=1.0, where="split"
        )


def test_lazily_opened_bytes_are_checked_without_decoding_the_sample_image():
    good = Image.open(io.BytesIO(_jpeg_bytes(1)))
    data = _jpeg_bytes(2)
    bad = Image.open(io.BytesIO(data[: len(data) // 2]))  # header fine, pixels cut (EMID cells)
    with pytest.warns(UserWarning, match="in-memory image of sample s1"):
        kept, skipped = check_images([_sample(0, [good]), _sample(1, [bad])], max_bad_share=0.5)
    assert skipped == 1 and [s.id for s in kept] == ["s0"]
    # The kept image is still lazy (checked on a copy) and still loads.
    assert good.fp is not None
    assert rgb_images([good])[0].size == (48, 48)


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_share_out_of_range_is_refused(share):
    with pytest.raises(InputError, match=r"max_bad_image_share must be in \[0, 1\]"):
        check_images([], max_bad_share=share, where="x")


def test_the_loader_names_an_unreadable_file_in_one_line(tmp_path):
    (path,) = _files(tmp_path, 1)
    _truncated_jpeg(tmp_path / "img00.jpg")
    with pytest.raises(InputError) as exc:
        rgb_images([path])
    assert str(exc.value).startswith(f"{path}: not a readable image (OSError")
    assert "\n" not in str(exc.value)


def test_read_checked_is_read_dataset_minus_unreadable_images(tmp_path, synthetic):
    import shutil
    from pathlib import Path

    from emomerge.training.data import read_checked, read_dataset

    root = tmp_path / "emoart"
    shutil.copytree(synthetic["emoart"], root)
    samples = read_dataset("emoart", root, "test")
    assert read_checked("emoart", root, "test") == (samples, 0)
    Path(samples[0].images[0]).write_bytes(b"")
    with pytest.raises(
        InputError,
        match=rf"^{root} split 'test': 1 of {len(samples)} image "
        "files unreadable",
    ):
        read_checked("emoart", root, "test")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        kept, skipped = read_checked("emoart", root, "test", max_bad_image_share=0.5)
    assert skipped == 1 and [s.id for s in kept] == [s.id for s in samples[1:]]
