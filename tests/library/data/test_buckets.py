"""Bucket lists, bucket choice and crop boxes against kohya's documented and hand-computed values."""

import numpy as np
import pytest

from library.data.buckets import (
    BucketSettings,
    crop_ltrb,
    crop_offset,
    make_bucket_resolutions,
    make_bucket_settings,
    select_bucket,
)
from library.errors import ConfigError, DatasetError

# kohya-ss/sd-scripts, 512x512 / min 256 / max 1024 / steps 64 (documented, and run in kohya.md §2.6).
KOHYA_512_BUCKETS = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576)]
KOHYA_512_BUCKETS = sorted(KOHYA_512_BUCKETS + [(h, w) for w, h in KOHYA_512_BUCKETS] + [(512, 512)])


def settings(resolution=(512, 512), **overrides):
    options = dict(
        enable_bucket=True,
        min_bucket_reso=256,
        max_bucket_reso=1024,
        bucket_reso_steps=64,
        bucket_no_upscale=False,
        where="test",
    )
    return make_bucket_settings(resolution, **{**options, **overrides})


def test_512_bucket_list_is_kohyas():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == KOHYA_512_BUCKETS
    assert len(KOHYA_512_BUCKETS) == 17


def test_768_bucket_list_has_19_buckets_around_768_squared():
    buckets = make_bucket_resolutions((768, 768), 256, 1024, 64)
    assert len(buckets) == 19
    assert (768, 768) in buckets and (1024, 576) in buckets and (576, 1024) in buckets
    assert all(w * h <= 768 * 768 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)


def test_an_exact_bucket_size_is_kept():
    chosen = select_bucket((448, 576), settings(), KOHYA_512_BUCKETS)
    assert (chosen.bucket, chosen.resized_size) == ((448, 576), (448, 576))


def test_wide_image_goes_to_closest_aspect_ratio_and_is_scaled_to_cover():
    # 1000x500 (AR 2.0): the closest bucket is 704x320 (AR 2.2); cover scale = max(704/1000, 320/500) = 0.704.
    chosen = select_bucket((1000, 500), settings(), KOHYA_512_BUCKETS)
    assert chosen.bucket == (704, 320)
    assert chosen.resized_size == (704, 352)
    assert chosen.aspect_ratio_error == pytest.approx(704 / 320 - 2.0)


def test_tall_image_is_scaled_by_width():
    # 300x700 (AR 0.4286): closest is 320x768 (AR 0.4167, error 0.012; 320x704 is 0.026 away).
    # The image is relatively wider than the bucket, so the height sets the scale: 768/700.
    chosen = select_bucket((300, 700), settings(), KOHYA_512_BUCKETS)
    assert chosen.bucket == (320, 768)
    assert chosen.resized_size == (329, 768)


def test_no_upscale_keeps_small_images_and_floors_to_steps():
    no_upscale = settings(bucket_no_upscale=True)
    chosen = select_bucket((300, 200), no_upscale, no_upscale.predefined_resolutions())
    assert no_upscale.predefined_resolutions() is None
    assert (chosen.bucket, chosen.resized_size) == ((256, 192), (300, 200))


def test_no_upscale_shrinks_large_images_to_the_area():
    # 2000x1000 above 512*512: the area-preserving size is 724.1x362.0. Width on the grid: 704, its
    # height 352 -> 320 on the grid, AR 2.2. Height on the grid: 320, width 640, AR 2.0 exactly: kept.
    no_upscale = settings(bucket_no_upscale=True)
    chosen = select_bucket((2000, 1000), no_upscale, None)
    assert chosen.resized_size == (640, 320)
    assert chosen.bucket == (640, 320)


def test_no_upscale_rejects_images_smaller_than_a_step():
    with pytest.raises(DatasetError, match="smaller than bucket_reso_steps 64"):
        select_bucket((40, 300), settings(bucket_no_upscale=True), None)


def test_without_buckets_everything_goes_to_the_resolution():
    fixed = make_bucket_settings(
        (512, 512),
        enable_bucket=False,
        min_bucket_reso=256,
        max_bucket_reso=1024,
        bucket_reso_steps=64,
        bucket_no_upscale=False,
        where="test",
    )
    assert fixed == BucketSettings((512, 512), enable_bucket=False)
    chosen = select_bucket((1024, 768), fixed, fixed.predefined_resolutions())
    assert (chosen.bucket, chosen.resized_size) == ((512, 512), (683, 512))


def test_min_and_max_are_rounded_to_steps_with_a_warning(caplog):
    adjusted = settings(min_bucket_reso=300, max_bucket_reso=1000)
    assert (adjusted.min_bucket_reso, adjusted.max_bucket_reso) == (256, 1024)
    assert "min_bucket_reso 300 rounded down to 256" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(bucket_reso_steps=32), "bucket_reso_steps is 32; SD1.x/SD2.x need a multiple of 64"),
        (dict(resolution=(500, 500)), "resolution 500x500 must be a multiple of bucket_reso_steps 64"),
        (dict(min_bucket_reso=576), "min_bucket_reso 576 is larger than the resolution"),
        (dict(max_bucket_reso=448), "max_bucket_reso 448 is smaller than the resolution"),
    ],
)
def test_bad_bucket_options_are_config_errors(overrides, message):
    resolution = overrides.pop("resolution", (512, 512))
    with pytest.raises(ConfigError, match=message):
        settings(resolution, **overrides)


def test_resolution_must_suit_the_vae_without_buckets():
    with pytest.raises(ConfigError, match="multiple of 8"):
        make_bucket_settings(
            (510, 512),
            enable_bucket=False,
            min_bucket_reso=256,
            max_bucket_reso=1024,
            bucket_reso_steps=64,
            bucket_no_upscale=False,
            where="test",
        )


@pytest.mark.parametrize(
    ("bucket", "size", "expected"),
    [
        ((512, 512), (512, 512), (0, 0, 512, 512)),
        ((512, 512), (1024, 512), (0, 128.0, 512, 384.0)),  # wider image: fitted inside, centred
        # tall image in a wide bucket: fitted width 320 * 300/700 = 137.14, left (704 - 137.14) // 2 = 283
        ((704, 320), (300, 700), (283.0, 0, 283.0 + 320 * 300 / 700, 320)),
    ],
)
def test_crop_ltrb_is_kohyas_fitted_box(bucket, size, expected):
    assert crop_ltrb(bucket, size) == pytest.approx(expected)


def test_crop_offset_is_centred_or_uniform():
    assert crop_offset(10, None) == 5
    assert crop_offset(0, None) == 0
    offsets = {crop_offset(3, np.random.default_rng(i)) for i in range(50)}
    assert offsets == {0, 1, 2, 3}
