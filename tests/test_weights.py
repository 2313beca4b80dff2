"""--vision-weights (the image-encoder weights other projects publish, in each project's own layout), the ObjectNet
evaluation set, and model_state_dict.pt (a run's weights as a plain state dict that open_clip reads)."""
import json
import os
import zipfile
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script, tiny_clip

import agft  # noqa: E402
import common  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tensors_equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def text_tower(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}


@pytest.fixture(scope="module")
def base_text():
    """The text encoder and logit scale of --model (tiny_ckpt, seed 0): --vision-weights leaves them alone."""
    return text_tower(tiny_clip(0))


@pytest.fixture
def encoder():
    """--model's image encoder, to load weights into directly (the error tests need no whole model)."""
    return tiny_clip(0).visual


@pytest.fixture(scope="module")
def source():
    """The 'released' model: a tiny CLIP other than --model's (seed 1), with a few optimizer steps' worth of state."""
    return tiny_clip(seed=1)


def sgd_state(params):
    """An optimizer state dict with momentum buffers, as the projects' training checkpoints hold one."""
    params = list(params)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for p in params:
        p.grad = None
    return opt.state_dict()


# Each project's checkpoint, written the way its training script saves it (the source lines are in the README's
# table "Released weights of other projects"). Each takes the source model and returns the object to torch.save.
def tecoa_file(model):  # TeCoA finetuning.py, PMG-AFT PMG_AFT.py, TGA-ZSR TGA-ZSR.py: save_checkpoint({...})
    visual = {k: v.clone() for k, v in model.visual.state_dict().items()}
    return {"epoch": 10, "state_dict": {}, "add_prompter": {},  # the prompters: empty, not the model
            "vision_encoder_state_dict": visual, "best_acc1": np.float64(38.18),  # a numpy mean over datasets
            "optimizer": sgd_state(tiny_clip(2).visual.parameters())}


def agft_file(model):  # AGFT train.py: torch.save(model.module.state_dict_train(), save_path)
    return {"modules": {"clip.visual": {k: v.clone() for k, v in model.visual.state_dict().items()}}, "params": {}}


def advflyp_file(model):  # AdvFLYP code/main.py: 'partial_state_dict' = the trainable (visual.*) parameters
    trainable = [n for n, _ in model.named_parameters() if n.startswith("visual.")]
    return {"epoch": 3, "state_dict": {}, "add_prompter": {},
            "partial_state_dict": {k: v.clone() for k, v in model.state_dict().items() if k in trainable},
            "best_acc1": np.float64(30.5), "optimizer": sgd_state(tiny_clip(2).visual.parameters())}


def robustvlm_file(model):  # RobustVLM train/adversarial_training_clip.py: torch.save(model.visual.state_dict())
    return {k: v.clone() for k, v in model.visual.state_dict().items()}


def openai_state_dict_file(model):  # a whole CLIP's state dict (open_clip's CLIP has the same key names)
    return {k: v.clone() for k, v in model.state_dict().items()}


def open_clip_training_file(model):  # open_clip's training checkpoint under DDP: "module." prefixes
    return {"epoch": 32, "name": "run", "state_dict": {f"module.{k}": v.clone() for k, v in model.state_dict().items()},
            "optimizer": sgd_state(tiny_clip(2).visual.parameters())}


def last_pt_file(model):  # this project's last.pt
    opt = torch.optim.SGD(model.visual.parameters(), lr=0.1, momentum=0.9)
    args = Namespace(warmup=2, lr=0.1, model="demo")
    return common.checkpoint_state(model, opt, torch.amp.GradScaler("cpu", enabled=False), 3, 10, args)


TORCH_SAVED = {
    "tecoa.pth.tar": (tecoa_file, "TeCoA / PMG-AFT / TGA-ZSR checkpoint"),
    "agft.pth": (agft_file, "AGFT checkpoint"),
    "advflyp.pth.tar": (advflyp_file, "AdvFLYP checkpoint"),
    "fare_eps_2.pt": (robustvlm_file, "image-encoder state dict (RobustVLM"),
    "openai_state_dict.pt": (openai_state_dict_file, "whole CLIP (OpenAI"),
    "open_clip_epoch_32.pt": (open_clip_training_file, "open_clip training checkpoint"),
    "last.pt": (last_pt_file, "checkpoint with a whole CLIP under 'model'"),
}


@pytest.fixture(scope="module")
def released(tmp_path_factory, source):
    """{file name: (path, expected layout)} of every format, all holding `source`'s image encoder."""
    d = tmp_path_factory.mktemp("released")
    files = {}
    for name, (make, layout) in TORCH_SAVED.items():
        torch.save(make(source), d / name)
        files[name] = (str(d / name), layout)
    common.save_torchscript(source, str(d / "model.pt"))  # this project's model.pt = an OpenAI-style release
    files["model.pt"] = (str(d / "model.pt"), "whole CLIP (OpenAI")
    hub = d / "hf-hub"  # open_clip's Hugging Face layout: weights + open_clip_config.json
    hub.mkdir()
    torch.save(openai_state_dict_file(source), hub / "open_clip_pytorch_model.bin")
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 64, "quick_gelu": True},
                                                           "preprocess_cfg": {}}))
    files["open_clip_pytorch_model.bin"] = (str(hub / "open_clip_pytorch_model.bin"), "whole CLIP (OpenAI")
    return files


@pytest.mark.parametrize("name", [*TORCH_SAVED, "model.pt", "open_clip_pytorch_model.bin"])
def test_every_format_loads_the_image_encoder_exactly(released, name, source, tiny_ckpt, base_text):
    path, layout = released[name]
    model = common.load_clip(tiny_ckpt, vision_weights=path)
    assert tensors_equal(model.visual.state_dict(), source.visual.state_dict())
    assert tensors_equal(text_tower(model), base_text)  # text encoder and logit scale: --model's
    assert next(model.parameters()).dtype == torch.float32
    assert common.vision_state_dict(common.read_checkpoint(path))[0].startswith(layout)


def test_half_precision_weights_become_fp32(tmp_path, source, encoder):
    """AGFT and TeCoA save the weights in the dtype they trained in (fp16 without --use_float)."""
    half = {k: v.half() for k, v in source.visual.state_dict().items()}
    torch.save({"modules": {"clip.visual": half}, "params": {}}, tmp_path / "agft_fp16.pth")
    common.load_vision_weights(encoder, str(tmp_path / "agft_fp16.pth"))
    assert tensors_equal(encoder.state_dict(), {k: v.float() for k, v in half.items()})


def test_numpy_scalar_saved_by_numpy_1_loads(tmp_path, source, encoder):
    """Files saved under numpy 1.x name the scalar constructor numpy.core.multiarray.scalar (numpy 2 writes
    numpy._core...): rewrite a checkpoint's pickle to the old name, as a 2023 TeCoA checkpoint has it."""
    torch.save(tecoa_file(source), tmp_path / "new.pt")
    with zipfile.ZipFile(tmp_path / "new.pt") as src, zipfile.ZipFile(tmp_path / "old.pt", "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            dst.writestr(item, data)
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "old.pt")
    obj = common.read_checkpoint(str(tmp_path / "old.pt"))
    assert isinstance(obj["best_acc1"], np.float64) and obj["best_acc1"] == 38.18
    common.load_vision_weights(encoder, str(tmp_path / "old.pt"))
    assert tensors_equal(encoder.state_dict(), source.visual.state_dict())


class Payload:
    """An object whose unpickling would run code (here: create a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_not_run(tmp_path, source, encoder):
    marker = str(tmp_path / "ran")
    torch.save({**tecoa_file(source), "args": Payload(marker)}, tmp_path / "evil.pth.tar")
    with pytest.raises(common.UsageError, match="unreadable checkpoint") as e:
        common.load_vision_weights(encoder, str(tmp_path / "evil.pth.tar"))
    assert not os.path.exists(marker) and "\n" not in str(e.value)


def one_line_error(encoder, obj, tmp_path, name="w.pt"):
    torch.save(obj, tmp_path / name)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(common.UsageError) as e:
        common.load_vision_weights(encoder, str(tmp_path / name))
    assert "\n" not in str(e.value) and tensors_equal(encoder.state_dict(), before)  # nothing half-loaded
    return str(e.value)


def test_mismatched_keys_and_shapes_are_one_line_errors(tmp_path, source, encoder):
    visual = source.visual.state_dict()
    wrong = {k: v for k, v in visual.items() if k not in ("proj", "ln_post.weight", "ln_post.bias", "conv1.weight")}
    message = one_line_error(encoder, {"vision_encoder_state_dict": wrong}, tmp_path)
    assert "4 missing (proj, conv1.weight, ln_post.weight, ...)" in message
    assert "(TeCoA / PMG-AFT / TGA-ZSR" in message

    extra = {**visual, "prompt_pos_embedding": torch.zeros(4, 128), "class_token": torch.zeros(1)}
    assert "2 unexpected (prompt_pos_embedding, class_token)" in one_line_error(encoder, extra, tmp_path)

    big = tiny_clip(3)  # another architecture: a wider image encoder
    big.visual.proj = torch.nn.Parameter(torch.zeros(128, 32))
    message = one_line_error(encoder, {"modules": {"clip.visual": big.visual.state_dict()}}, tmp_path)
    assert "1 mis-shaped (proj (128, 32) in the file, (128, 64) in the model)" in message

    with_text = {**advflyp_file(source)}
    with_text["partial_state_dict"]["ln_final.weight"] = torch.ones(64)  # AdvFLYP --AFT_modules visual ln_final
    assert "1 key(s) outside the image encoder (ln_final.weight)" in one_line_error(encoder, with_text, tmp_path)

    message = one_line_error(encoder, {"modules": {}, "params": {"image_prompt": torch.zeros(1, 3, 32, 32)}},
                             tmp_path)  # an AGFT visual-prompt run: no encoder weights
    assert "no image-encoder weights in a known layout" in message


def test_file_errors(tmp_path, tiny_ckpt, encoder):
    with pytest.raises(common.UsageError, match="--vision-weights .*: no such file"):
        common.load_clip(tiny_ckpt, vision_weights=str(tmp_path / "missing.pt"))
    with pytest.raises(common.UsageError, match="is a directory"):
        common.load_vision_weights(encoder, str(tmp_path))
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(common.UsageError, match="safetensors files are not read"):
        common.load_vision_weights(encoder, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.UsageError, match="unreadable checkpoint"):
        common.load_vision_weights(encoder, str(tmp_path / "corrupt.pt"))


@pytest.mark.parametrize("config", [{"model_cfg": {"embed_dim": 64}}, {"model_cfg": {"quick_gelu": False}}])
def test_open_clip_model_trained_with_gelu_is_refused(tmp_path, source, encoder, config):
    torch.save(openai_state_dict_file(source), tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(common.UsageError, match="GELU activations.*QuickGELU") as e:
        common.load_vision_weights(encoder, str(tmp_path / "open_clip_pytorch_model.bin"))
    assert "\n" not in str(e.value)


def test_vision_state_dict_is_pure_and_orders_layouts(source):
    """TeCoA's file also has a 'state_dict' entry (a prompter); the vision_encoder_state_dict entry decides."""
    obj = tecoa_file(source)
    obj["state_dict"] = {"module.pad_up": torch.zeros(1)}
    before = {k: v for k, v in obj.items()}
    layout, weights, outside = common.vision_state_dict(obj)
    assert layout.startswith("TeCoA") and outside == [] and obj.keys() == before.keys()
    assert common.vision_state_dict({"foo": 1}) is None and common.vision_state_dict([1, 2]) is None


# ---------------------------------------------------------------------------------------------------- end to end
def test_evaluate_with_vision_weights(tmp_path, source):
    """evaluate.py --model demo --vision-weights FILE: the demo's text encoder with another image encoder. Its
    clean accuracy is the one computed in-process with that encoder, and not the demo's own."""
    weights = tmp_path / "fare_eps_1.pt"
    torch.save(robustvlm_file(source), weights)
    out = tmp_path / "eval.json"
    r = run_script(["evaluate.py", "--model", "demo", "--vision-weights", str(weights), "--datasets", "demo",
                    "--attacks", "pgd", "--steps", "1", "--samples", "64", "--batch-size", "64", "--workers", "0",
                    "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert "image-encoder state dict (RobustVLM" in r.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["vision_weights"] == str(weights)

    from evaluate import fixed_subset, zero_shot_eval
    dist = common.Dist(0, 1, 0, torch.device("cpu"))
    expected = {}
    for vision_weights in (str(weights), None):
        model = common.load_clip("demo", vision_weights=vision_weights)
        name, ds, classes, template = common.eval_dataset("demo", ".", 32)
        text = common.text_features(model, common.prompts_for(classes, template), dist.device)
        expected[vision_weights] = zero_shot_eval(common.ImageEncoder(model.visual), text, fixed_subset(ds, 64, 0),
                                                  dist, attacks=())["clean"]
    # the same 64 images in one batch through the same ops at the same thread count: the same predictions, exactly
    assert report["datasets"]["demo"]["clean"] == expected[str(weights)] != expected[None]


def test_training_starts_from_vision_weights_and_writes_open_clip_state_dict(tmp_path, source, tiny_ckpt,
                                                                             base_text):
    """agft.py --vision-weights: training starts from those weights (lr 1e-9: one step hardly moves them), the
    text encoder is --model's; the run writes model_state_dict.pt beside model.pt, with the same weights."""
    weights = tmp_path / "tecoa.pth.tar"
    torch.save(tecoa_file(source), weights)
    out = str(tmp_path / "run")
    agft.main(["--model", tiny_ckpt, "--vision-weights", str(weights), "--data", "synthetic", "--synthetic-size",
               "8", "--batch-size", "8", "--max-steps", "1", "--warmup", "1", "--lr", "1e-9", "--eps", "4",
               "--workers", "0", "--amp", "off", "--out", out])
    names = set(os.listdir(out))
    assert {"model.pt", "model_state_dict.pt", "last.pt"} <= names and not any(n.endswith(".tmp") for n in names)
    assert json.load(open(os.path.join(out, "args.json")))["vision_weights"] == str(weights)
    final = common.load_clip(os.path.join(out, "model.pt"))
    for k, v in source.visual.state_dict().items():
        assert torch.allclose(final.visual.state_dict()[k], v, atol=1e-6), k
    assert not torch.equal(final.visual.proj, tiny_clip(0).visual.proj)
    assert tensors_equal(text_tower(final), base_text)
    plain = torch.load(os.path.join(out, "model_state_dict.pt"), weights_only=True)
    assert tensors_equal(plain, final.state_dict()) and all(v.dtype == torch.float32 for v in plain.values())


# ------------------------------------------------------------------------------------------- model_state_dict.pt
@pytest.fixture(scope="module")
def open_clip():
    """open_clip, a test-only requirement (requirements-test.txt)."""
    import open_clip as oc
    return oc


def test_open_clip_reads_model_state_dict(tmp_path, open_clip, source):
    """open_clip.create_model_and_transforms(NAME, pretrained=model_state_dict.pt) builds the same model: same
    weights, same image and text features (the tiny architecture registered as an open_clip config)."""
    run = common.Run(Namespace(out=str(tmp_path / "run"), method="test"), common.Dist(0, 1, 0, torch.device("cpu")),
                     dataset_size=0)
    run.write_model(source)
    embed, res, layers, width, patch, ctx, vocab, t_width, t_heads, t_layers = common.ARCHITECTURES["tiny"]
    config = {"embed_dim": embed, "quick_gelu": True,
              "vision_cfg": {"image_size": res, "layers": layers, "width": width, "patch_size": patch},
              "text_cfg": {"context_length": ctx, "vocab_size": vocab, "width": t_width, "heads": t_heads,
                           "layers": t_layers}}
    (tmp_path / "clip-aft-tiny-quickgelu.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "clip-aft-tiny-quickgelu.json"))
    model, _, _ = open_clip.create_model_and_transforms("clip-aft-tiny-quickgelu",
                                                        pretrained=str(tmp_path / "run" / "model_state_dict.pt"))
    model.eval()
    assert tensors_equal(model.state_dict(), source.state_dict())
    images = torch.randn(3, 3, 32, 32)
    tokens = open_clip.tokenize(["a red ring", "a photo of a dog", "x"], context_length=ctx)
    with torch.no_grad():  # the same function (QuickGELU); open_clip's attention kernels round differently
        assert torch.allclose(model.encode_image(images), source.encode_image(images), rtol=1e-5, atol=1e-5)
        assert torch.allclose(model.encode_text(tokens), source.encode_text(tokens), rtol=1e-5, atol=1e-5)


def test_open_clip_vit_b_32_quickgelu_has_our_keys_and_shapes(open_clip):
    """The file of a ViT-B/32 run fits open_clip's ViT-B-32-quickgelu: same keys, same shapes (built on the meta
    device: no memory, no weights)."""
    with torch.device("meta"):
        ours = common.CLIP(*common.ARCHITECTURES["ViT-B/32"]).state_dict()
        theirs = open_clip.create_model("ViT-B-32-quickgelu", device="meta").state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


# ------------------------------------------------------------------------------------------------------- ObjectNet
def png(path, interior, border=2):
    """An ObjectNet-like image: `interior` (H, W, 3 uint8) inside a red frame `border` pixels wide."""
    h, w, _ = interior.shape
    image = np.zeros((h + 2 * border, w + 2 * border, 3), dtype=np.uint8)
    image[..., 0] = 255
    image[border:border + h, border:border + w] = interior
    Image.fromarray(image).save(path)


@pytest.fixture(scope="module")
def objectnet(tmp_path_factory):
    """A fake objectnet-1.0: 3 overlapping classes (2 ImageNet labels for one), 1 class that is not in ImageNet,
    mappings in ObjectNet's format. Returns (root, {folder: [interior arrays in file order]})."""
    root = tmp_path_factory.mktemp("data")
    base = root / "objectnet-1.0"
    folders = {"alarm_clock": "Alarm clock", "banana": "Banana", "air_freshener": "Air freshener",
               "t-shirt": "T-shirt"}
    (base / "mappings").mkdir(parents=True)
    (base / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps(folders, indent=1))
    (base / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {"Alarm clock": "analog clock; digital clock", "Banana": "banana", "T-shirt": "jersey, T-shirt, tee shirt"},
        indent=1))
    (base / "mappings" / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({"0": 409, "1": 530}))
    rng = np.random.default_rng(0)
    interiors = {}
    for i, folder in enumerate(sorted(folders)):
        (base / "images" / folder).mkdir(parents=True)
        interiors[folder] = []
        for j in range(i % 2 + 1):
            interior = rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)
            png(base / "images" / folder / f"{j:03d}{folder[:3]}.png", interior)
            interiors[folder].append(interior)
    return str(root), interiors


def test_objectnet_overlap_classes_names_and_cropped_images(objectnet):
    root, interiors = objectnet
    name, ds, classes, template = common.eval_dataset("ObjectNet", root, 32)
    assert name == "ObjectNet" and template == "This is a photo of a {}."
    assert classes == ["alarm clock", "banana", "t shirt"]  # sorted folders; names from ObjectNet's labels
    expected = [(interior, label) for label, folder in enumerate(["alarm_clock", "banana", "t-shirt"])
                for interior in interiors[folder]]
    assert len(ds) == len(expected) == 5  # of 6 images: air_freshener (not in ImageNet) left out
    for i, (interior, label) in enumerate(expected):
        image, y = ds[i]
        assert y == label
        assert torch.equal(image, torch.from_numpy(interior).permute(2, 0, 1).float() / 255)  # frame gone exactly


def test_objectnet_registry_errors(tmp_path, objectnet):
    with pytest.raises(common.UsageError, match="ObjectNet: not found, expected .*objectnet-1.0"):
        common.eval_dataset("ObjectNet", str(tmp_path), 32)
    base = tmp_path / "objectnet-1.0"
    (base / "mappings").mkdir(parents=True)
    (base / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps({"banana": "Banana"}))
    with pytest.raises(common.UsageError, match="cannot read .*objectnet_to_imagenet_1k.json"):
        common.eval_dataset("ObjectNet", str(tmp_path), 32)
    (base / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps({"Banana": "banana",
                                                                                "Pen": "ballpoint"}))
    with pytest.raises(common.UsageError, match="1 label.*no folder.*'Pen'"):
        common.eval_dataset("ObjectNet", str(tmp_path), 32)
    (base / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps({"Banana": "banana"}))
    with pytest.raises(common.UsageError, match="no images in .*banana"):
        common.eval_dataset("ObjectNet", str(tmp_path), 32)
