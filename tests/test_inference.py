"""equiray.inference: untrusted bytes and arrays are decoded or refused with a message that says why; predictions
carry the ensemble's member disagreement and the canonicalizer's chosen element."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from equiray import create_model
from equiray.inference import (BadInput, InputLimits, decode_image, describe_element, from_array,
                               predict_detailed, to_model_input)


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def test_decode_png_and_jpeg_to_the_models_channels(gen):
    grey = torch.randint(0, 256, (9, 7), generator=gen, dtype=torch.uint8).numpy()
    x = decode_image(encode(grey), in_chans=1)
    assert x.shape == (1, 9, 7) and torch.equal(x[0], torch.from_numpy(grey).float() / 255)  # PNG is lossless
    rgb = np.stack([grey] * 3, -1)
    assert decode_image(encode(rgb, "JPEG"), in_chans=3).shape == (3, 9, 7)
    assert decode_image(encode(rgb), in_chans=1).shape == (1, 9, 7)  # colour -> grey for a grey model


@pytest.mark.parametrize("data, words", [
    (b"", "empty"), (b"GIF89a" + b"\0" * 40, "not a PNG or JPEG"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 10, "PNG"),
])
def test_decode_refuses_what_is_not_an_image(data, words):
    with pytest.raises(BadInput, match=words):
        decode_image(data, in_chans=1)


def test_decode_refuses_truncated_files_and_checks_size_before_decoding():
    data = encode(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    with pytest.raises(BadInput, match="truncated"):
        decode_image(data[: len(data) // 2], in_chans=1)
    with pytest.raises(BadInput, match="64 x 64 pixels"):
        decode_image(data, in_chans=1, limits=InputLimits(max_side=32))


@pytest.mark.parametrize("value, words", [
    ([[0.1, float("nan")]], "NaN or infinite"), ([[0.1, float("inf")]], "NaN or infinite"),
    ([[0.0, 255.0]], "divide"), ([[-0.5, 0.2]], r"\[0, 1\]"), ([[0.1], [0.1, 0.2]], "rectangular"),
    ([0.1, 0.2], r"shape \(2,\)"), ([[["a"]]], "numbers"), (np.zeros((2, 4, 4)).tolist(), r"shape \(2, 4, 4\)"),
])
def test_arrays_are_refused_with_the_reason(value, words):
    with pytest.raises(BadInput, match=words):
        from_array(value, in_chans=1)


def test_array_layouts_and_resizing():
    hw = np.random.default_rng(1).random((6, 6)).astype(np.float32)
    assert torch.equal(from_array(hw.tolist(), in_chans=1)[0], torch.from_numpy(hw))
    chw = np.random.default_rng(2).random((3, 5, 4)).astype(np.float32)
    assert torch.equal(from_array(chw.transpose(1, 2, 0).tolist(), in_chans=3), torch.from_numpy(chw))  # (H, W, C)
    batch = to_model_input([torch.rand(1, 28, 28), torch.rand(1, 14, 14)], (1, 14, 14))
    assert batch.shape == (2, 1, 14, 14)
    with pytest.raises(BadInput, match="3 channels"):
        to_model_input([torch.rand(3, 14, 14)], (1, 14, 14))


def test_ensemble_disagreement_is_the_share_of_members_outvoted(gen):
    torch.manual_seed(0)
    ens = create_model("ensemble", member="small_cnn", member_kwargs={"width": 4}, num_members=5).eval()
    x = torch.rand(6, 1, 14, 14, generator=gen)
    out = predict_detailed(ens, x)
    with torch.no_grad():
        members = ens.member_logits(x)  # (5, 6, 10)
        assert torch.allclose(out.logits, ens(x), atol=1e-6)
    top = out.logits.argmax(-1)
    expected = torch.tensor([(members[:, i].argmax(-1) != top[i]).sum().item() / 5 for i in range(6)])
    assert torch.allclose(out.disagreement, expected) and out.element is None
    assert torch.allclose(out.probabilities.sum(-1), torch.ones(6))


def test_canonicalized_model_reports_its_element(gen):
    torch.manual_seed(0)
    model = create_model("canonicalized", backbone="small_cnn", backbone_kwargs={"width": 4},
                         canonicalizer="equivariant", canonicalizer_kwargs={"channels": 4}, group="C4").eval()
    x = torch.rand(4, 1, 14, 14, generator=gen)
    out = predict_detailed(model, x)
    with torch.no_grad():
        _, info = model.forward_with_info(x)
    assert torch.equal(out.element, info.element) and out.disagreement is None
    assert describe_element(model.group, 3) == {"index": 3, "group": "C4", "rotation_deg": 270.0, "reflection": False}


def test_mixture_reports_its_canonicalized_members_pose_and_the_members_disagreement(gen):
    """A mixture answers what its forward answers; its canonicalized member tells the pose (as that member alone
    would); the disagreement is the share of members whose top class differs from the mixture's."""
    from equiray.models import Mixture

    torch.manual_seed(0)
    canon = create_model("canonicalized", backbone="small_cnn", backbone_kwargs={"width": 4},
                         canonicalizer="equivariant", canonicalizer_kwargs={"channels": 4}, group="C4",
                         pose="angle").eval()
    plain = create_model("small_cnn", width=4).eval()
    mix = Mixture([plain, canon], [0.3, 0.7]).eval()
    x = torch.rand(8, 1, 14, 14, generator=gen)
    out = predict_detailed(mix, x)
    alone = predict_detailed(canon, x)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, mix(x))
        tops = torch.stack([plain(x).argmax(-1), canon(x).argmax(-1)])
    torch.testing.assert_close(out.pose_deg, alone.pose_deg)
    assert torch.equal(out.element, alone.element)
    torch.testing.assert_close(out.disagreement, (tops != out.logits.argmax(-1)).float().mean(0))
    # sensitivity: members that disagree somewhere (else the disagreement could be a constant 0)
    assert out.disagreement.max() > 0
