"""mp4 writing through PyAV and the official post-processing, checked by reading the files back."""

import numpy as np
import pytest
import torch

from stepvideo_core.video_io import (center_crop, crop_to_540p, official_to_uint8, read_frames, read_video_info,
                                     to_uint8_frames, write_mp4)


def gradient_video(frames=6, height=48, width=64) -> torch.Tensor:
    """Smooth float frames [T, H, W, 3] in [0, 1]: red follows x, green y, blue time (H.264 keeps these close)."""
    shape = (frames, height, width)
    red = torch.linspace(0, 1, width).view(1, 1, width).expand(shape)
    green = torch.linspace(0, 1, height).view(1, height, 1).expand(shape)
    blue = torch.linspace(0, 1, frames).view(frames, 1, 1).expand(shape)
    return torch.stack([red, green, blue], dim=-1)


@pytest.mark.parametrize("kind", ["uint8", "float01", "float11", "numpy"])
def test_written_file_reads_back_with_count_size_and_rate(tmp_path, kind):
    video = gradient_video()
    frames = {"uint8": (video * 255).to(torch.uint8), "float01": video, "float11": video * 2 - 1,
              "numpy": (video * 255).to(torch.uint8).numpy()}[kind]
    value_range = (-1, 1) if kind == "float11" else (0, 1)
    path = write_mp4(tmp_path / "sub" / "clip.mp4", frames, fps=25, value_range=value_range)
    info = read_video_info(path)
    assert info == {"frames": 6, "width": 64, "height": 48, "fps": 25.0, "codec": "h264", "pix_fmt": "yuv420p"}
    back = read_frames(path).astype(np.float32)
    assert back.shape == (6, 48, 64, 3)
    assert np.abs(back - (video.numpy() * 255)).mean() < 4  # lossy, but the picture survives


def test_other_frame_rates_and_quality(tmp_path):
    video = gradient_video(frames=4)
    info = read_video_info(write_mp4(tmp_path / "a.mp4", video, fps=8, crf=10))
    assert info["fps"] == 8.0 and info["frames"] == 4
    assert read_video_info(write_mp4(tmp_path / "b.mp4", video, fps=24000 / 1001))["fps"] == pytest.approx(23.976, 1e-3)


def test_bad_frames_are_refused(tmp_path):
    with pytest.raises(ValueError, match="even width and height"):
        write_mp4(tmp_path / "odd.mp4", torch.zeros(2, 17, 16, 3))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        write_mp4(tmp_path / "chw.mp4", torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(tmp_path / "empty.mp4", torch.zeros(0, 16, 16, 3))
    with pytest.raises(ValueError, match="value_range"):
        to_uint8_frames(torch.zeros(1, 2, 2, 3), value_range=(1, 1))


def test_official_post_processing_is_clamp_scale_truncate():
    video = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 7, 1, 1, 1).expand(1, 7, 3, 2, 2)
    out = official_to_uint8(video)  # [B, T, 3, H, W] -> [T, H, W, 3]
    assert out.dtype == torch.uint8 and out.shape == (7, 2, 2, 3)
    assert out[:, 0, 0, 0].tolist() == [0, 0, 63, 127, 254, 255, 255]  # (x+1)*127.5, truncated like .to(uint8)
    assert official_to_uint8(video[0]).equal(out)
    with pytest.raises(ValueError):
        official_to_uint8(torch.zeros(2, 4, 4, 3))


def test_float_frames_map_like_comfyui_images():
    frames = torch.tensor([0.0, 0.5, 1.0, 1.5, -0.2]).view(5, 1, 1, 1).expand(5, 2, 2, 3)
    assert to_uint8_frames(frames)[:, 0, 0, 0].tolist() == [0, 127, 255, 255, 0]


def test_crops():
    frames = torch.zeros(1, 544, 992, 3)
    assert tuple(crop_to_540p(frames).shape) == (1, 540, 960, 3)
    assert tuple(crop_to_540p(torch.zeros(1, 992, 544, 3)).shape) == (1, 960, 540, 3)
    assert tuple(crop_to_540p(torch.zeros(1, 64, 64, 3)).shape) == (1, 64, 64, 3)
    marked = torch.arange(10).view(1, 1, 10, 1).expand(1, 4, 10, 3)
    assert center_crop(marked, 2, 4)[0, 0, :, 0].tolist() == [3, 4, 5, 6]
