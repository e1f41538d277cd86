"""Combining reference images, saving and loading embeddings, preparing non-square images."""
import pytest
import torch
from safetensors.torch import save_file

from ipadapter_core import EncoderMismatchError
from ipadapter_core.embeds import ImageEmbeds, combine_embeds
from ipadapter_core.embeds_files import EmbedsFileError, load_embeds, save_embeds
from ipadapter_core.image_prep import prep_image

A = torch.tensor([[1.0, -2.0, 3.0]])
B = torch.tensor([[3.0, 2.0, -1.0]])
C = torch.tensor([[0.0, 4.0, 0.0]])


def embeds(cond, uncond=None):
    return ImageEmbeds(cond, torch.zeros_like(cond) if uncond is None else uncond, "image_embeds", "zero_embeds")


@pytest.mark.parametrize("method,expected", [
    ("add", [[4.0, 4.0, 2.0]]),
    ("subtract", [[-2.0, -8.0, 4.0]]),
    ("average", [[4 / 3, 4 / 3, 2 / 3]]),
    ("max", [[3.0, 4.0, 3.0]]),
    ("min", [[0.0, -2.0, -1.0]]),
])
def test_elementwise_combines_match_hand_computed_rows(method, expected):
    out = combine_embeds([embeds(A), embeds(torch.cat([B, C]))], method)
    torch.testing.assert_close(out.cond, torch.tensor(expected))
    assert out.uncond.shape == (1, 3) and not out.uncond.any()


def test_norm_average_averages_directions_at_the_mean_norm():
    out = combine_embeds([embeds(torch.tensor([[3.0, 4.0]])), embeds(torch.tensor([[0.0, 10.0]]))], "norm average")
    # unit rows (0.6, 0.8) and (0, 1): mean (0.3, 0.9), times the mean norm (5 + 10) / 2 = 7.5
    torch.testing.assert_close(out.cond, torch.tensor([[2.25, 6.75]]))


def test_concat_keeps_every_image_and_its_uncond():
    u = torch.ones(1, 3)
    out = combine_embeds([embeds(A, u), embeds(B, 2 * u)], "concat")
    torch.testing.assert_close(out.cond, torch.cat([A, B]))
    torch.testing.assert_close(out.uncond, torch.cat([u, 2 * u]))


def test_merged_uncond_is_the_mean_of_the_unconds():
    out = combine_embeds([embeds(A, torch.ones(1, 3)), embeds(B, 3 * torch.ones(1, 3))], "average")
    torch.testing.assert_close(out.uncond, 2 * torch.ones(1, 3))


def test_different_kinds_are_not_combined():
    plus = ImageEmbeds(torch.zeros(1, 257, 1280), torch.zeros(1, 257, 1280), "penultimate_hidden_states",
                       "zero_pixels")
    with pytest.raises(EncoderMismatchError, match="cannot combine embeddings of different kinds"):
        combine_embeds([embeds(torch.zeros(1, 1024)), plus])
    with pytest.raises(ValueError, match="unknown combine method 'median'"):
        combine_embeds([embeds(A), embeds(B)], "median")


def test_saved_embeds_load_back_exactly_with_their_metadata(tmp_path):
    original = ImageEmbeds(torch.randn(2, 257, 1280), torch.randn(2, 257, 1280), "penultimate_hidden_states",
                           "zero_pixels")
    save_embeds(original, str(tmp_path / "e.safetensors"), {"variant": "plus"})
    loaded, metadata = load_embeds(str(tmp_path / "e.safetensors"))
    assert torch.equal(loaded.cond, original.cond) and torch.equal(loaded.uncond, original.uncond)
    assert (loaded.encoder_output, loaded.uncond_mode, metadata["variant"]) == \
        ("penultimate_hidden_states", "zero_pixels", "plus")


def test_foreign_or_broken_embeds_files_are_refused(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(EmbedsFileError, match="other.safetensors is not an IPX embeddings file"):
        load_embeds(str(tmp_path / "other.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(EmbedsFileError, match="broken.safetensors cannot be read"):
        load_embeds(str(tmp_path / "broken.safetensors"))


def striped(h, w):
    image = torch.zeros(1, h, w, 3)
    image[:, :, : w // 2] = 1.0  # left half white
    image[:, : h // 4] = 0.5     # top quarter gray
    return image


@pytest.mark.parametrize("position", ["center", "top", "bottom", "left", "right", "pad"])
def test_prep_gives_a_square_at_any_aspect(position):
    out = prep_image(striped(300, 500), 224, position)
    assert out.shape == (1, 224, 224, 3) and 0 <= out.min() and out.max() <= 1


def test_crop_positions_choose_the_side():
    wide = striped(200, 600)
    assert prep_image(wide, 64, "left")[0, 40, :, 0].mean() > 0.95        # the white left third
    assert prep_image(wide, 64, "right")[0, 40, :, 0].mean() < 0.05       # the black right third
    tall = striped(600, 200)
    assert prep_image(tall, 64, "top")[0, :5].mean() == pytest.approx(0.5, abs=0.02)  # the gray top


def test_pad_keeps_the_whole_image_and_pads_evenly():
    out = prep_image(torch.ones(1, 100, 200, 3), 64, "pad")
    assert out[0, :16].max() == 0 and out[0, -16:].max() == 0 and out[0, 17:47].min() > 0.99


def test_sharpening_raises_edge_contrast():
    image = 0.3 + 0.4 * striped(224, 224)  # a 0.3 / 0.7 edge at column 112, room to overshoot both ways
    soft = prep_image(image, 224, "center")
    sharp = prep_image(image, 224, "center", sharpening=1.0)
    assert torch.equal(soft, prep_image(image, 224, "center", sharpening=0.0))
    assert sharp[0, 120, 111, 0] > soft[0, 120, 111, 0] + 0.1 and sharp[0, 120, 112, 0] < soft[0, 120, 112, 0] - 0.1
    torch.testing.assert_close(sharp[0, 120, 50:100], soft[0, 120, 50:100])  # flat areas are left alone
