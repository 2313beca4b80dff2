"""common.py, what the training scripts share: --vision-weights (the image-encoder weights other projects publish,
in each project's own layout), the ObjectNet evaluation set, model_state_dict.pt (a run's weights as a plain state
dict that open_clip reads), PGD, random starts and the schedule, loading models, the image encoder (ViT tokens,
ResNet) and the training data readers (image folders, CSV/TSV and img2dataset captions). The run directory (Run) and
the cluster paths are in test_cluster.py."""
import collections
import json
import os
import zipfile
from argparse import Namespace

import clip
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import agft
import common
import eval_datasets
from conftest import run_main_in_process, run_script, tiny_clip, write_images, zero_shot_eval

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


# Each project's checkpoint, written the way its training script saves it (the source lines are in the table of
# docs/released-weights.md). Each takes the source model and returns the object to torch.save.
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
    with pytest.raises(common.UsageError, match="unreadable checkpoint: it holds Python objects besides") as e:
        common.load_vision_weights(encoder, str(tmp_path / "evil.pth.tar"))
    assert not os.path.exists(marker) and "\n" not in str(e.value) and "weights_only" not in str(e.value)


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
    with pytest.raises(common.UsageError, match="unreadable checkpoint: not a PyTorch checkpoint, state dict or "
                                                "TorchScript archive$"):
        common.load_vision_weights(encoder, str(tmp_path / "corrupt.pt"))
    torch.save(encoder.state_dict(), tmp_path / "whole.pt")  # cut short, as by an interrupted copy
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:2000])
    with pytest.raises(common.UsageError, match=r"unreadable checkpoint: a PyTorch archive that is truncated or "
                                                r"corrupt \(an interrupted download or copy\?\)$"):
        common.load_vision_weights(encoder, str(tmp_path / "cut.pt"))


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
@pytest.mark.slow
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

    from evaluate import fixed_subset
    dist = common.Dist(0, 1, 0, torch.device("cpu"))
    expected = {}
    for vision_weights in (str(weights), None):
        model = common.load_clip("demo", vision_weights=vision_weights)
        name, ds, classes, template = eval_datasets.eval_dataset("demo", ".", 32)
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
    run = common.Run(Namespace(out=str(tmp_path / "run"), method="test", eps=1.0, attack_steps=2),
                     common.Dist(0, 1, 0, torch.device("cpu")),
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
    name, ds, classes, template = eval_datasets.eval_dataset("ObjectNet", root, 32)
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
        eval_datasets.eval_dataset("ObjectNet", str(tmp_path), 32)
    base = tmp_path / "objectnet-1.0"
    (base / "mappings").mkdir(parents=True)
    (base / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps({"banana": "Banana"}))
    with pytest.raises(common.UsageError, match="cannot read .*objectnet_to_imagenet_1k.json"):
        eval_datasets.eval_dataset("ObjectNet", str(tmp_path), 32)
    (base / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps({"Banana": "banana",
                                                                                "Pen": "ballpoint"}))
    with pytest.raises(common.UsageError, match="1 label.*no folder.*'Pen'"):
        eval_datasets.eval_dataset("ObjectNet", str(tmp_path), 32)
    (base / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps({"Banana": "banana"}))
    with pytest.raises(common.UsageError, match="no images in .*banana"):
        eval_datasets.eval_dataset("ObjectNet", str(tmp_path), 32)


# ------------------------------------------------------------------------------------ PGD, random starts, the schedule
@pytest.fixture(scope="module")
def tiny_encoder():
    model = tiny_clip()
    enc = common.ImageEncoder(model.visual).eval()
    text = common.text_features(model, common.prompts_for([f"class {i}" for i in range(7)]), "cpu")
    return enc, text


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_pgd_stays_in_eps_ball_and_image_range(tiny_encoder, amp):
    enc, text = tiny_encoder
    _, ctx, _ = common.amp_setup(amp, torch.device("cpu"))
    x = torch.rand(6, 3, 32, 32)
    x[0] = 0.0  # saturated images test the [0, 1] clamp
    x[1] = 1.0
    y = torch.arange(6) % 7
    eps = 8 / 255

    def loss_fn(x_adv):
        with ctx:
            return F.cross_entropy(100 * common.cosine_sim(enc(x_adv), text), y)

    x_adv = common.pgd(loss_fn, x, eps, 2 / 255, 5)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)
    assert all(p.grad is None for p in enc.parameters()), "the attack must not accumulate parameter gradients"


def test_pgd_increases_loss_and_eps_zero_is_identity(tiny_encoder):
    enc, text = tiny_encoder
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss_fn = lambda xa: F.cross_entropy(100 * common.cosine_sim(enc(xa), text), y)  # noqa: E731
    assert torch.equal(common.pgd(loss_fn, x, 0.0, 1 / 255, 5), x)
    x_adv = common.pgd(loss_fn, x, 4 / 255, 1 / 255, 10)
    with torch.no_grad():
        assert loss_fn(x_adv) > loss_fn(x)


def test_random_start_and_batches_do_not_depend_on_world_size():
    shape = (8, 3, 4, 4)
    one = common.random_start(shape, 0.1, seed=3, step=5, rank=0, world=1, device="cpu")
    two = torch.cat([common.random_start(shape, 0.1, 3, 5, r, 2, "cpu") for r in range(2)])
    assert torch.equal(one, two) and one.abs().max() <= 0.1
    s1 = common.GlobalBatchSampler(37, 8, 0, 1, seed=1)
    s2 = [common.GlobalBatchSampler(37, 8, r, 2, seed=1) for r in range(2)]
    for epoch in (0, 1):
        s1.set_epoch(epoch)
        [s.set_epoch(epoch) for s in s2]
        batches1 = list(s1)
        batches2 = [a + b for a, b in zip(*[list(s) for s in s2])]
        assert batches1 == batches2 and len(batches1) == 37 // 8
    s1.set_epoch(1, start=2)  # resume skips the batches already done
    s1b = common.GlobalBatchSampler(37, 8, 0, 1, seed=1)
    s1b.set_epoch(1)
    assert list(s1) == list(s1b)[2:]


def test_cosine_lr_schedule():
    lrs = [common.cosine_lr(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_warmup_as_a_share_of_the_run():
    """--warmup 0.1: a tenth of the run's steps (a short run still reaches its peak); whole numbers stay steps, and
    anything else is refused by the parser. AdvFLYP's Figure 3 at 10,000 pairs and batch 1,024: 9 steps an epoch, 900
    over 100 epochs, all inside the paper's 1,000-step warm-up (peak 0.9 lr), where 0.1 peaks at step 90."""
    assert common.warmup_steps(0.1, 900) == 90 and common.warmup_steps(1000, 900) == 1000
    assert [common.cosine_lr(s, 1.0, 0.1, 900) for s in (0, 89, 90)] == [1 / 90, 1.0, 1.0]
    assert max(common.cosine_lr(s, 1.0, 1000, 900) for s in range(900)) == 0.9
    parser = common.train_parser("doc", "agft", lr=1e-5)
    assert parser.parse_args(["--warmup", "0.1"]).warmup == 0.1 and parser.parse_args(["--warmup", "20"]).warmup == 20
    for bad in ("1.5", "-1", "ten"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--warmup", bad])


# ------------------------------------------------------------------------------------------------------ loading models
def test_load_clip_formats(tmp_path, tiny_ckpt):
    ref = tiny_clip().state_dict()
    model = common.load_clip(tiny_ckpt)
    assert isinstance(model, clip.model.CLIP) and all(torch.equal(v, model.state_dict()[k]) for k, v in ref.items())
    ts = str(tmp_path / "model.pt")
    common.save_torchscript(model, ts)
    model2 = common.load_clip(ts)  # TorchScript archive, read back exactly in fp32
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in ref.items())
    rnd = common.load_clip("random:tiny", seed=0)
    assert rnd.visual.input_resolution == 32 and next(rnd.parameters()).dtype == torch.float32
    with pytest.raises(common.UsageError, match="no such file"):
        common.load_clip(str(tmp_path / "missing.pt"))
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.UsageError, match="unreadable checkpoint"):
        common.load_clip(str(tmp_path / "corrupt.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(common.UsageError, match="not a CLIP checkpoint"):
        common.load_clip(str(tmp_path / "other.pt"))
    with pytest.raises(common.UsageError, match="unknown architecture"):
        common.load_clip("random:ViT-X/99")


# ------------------------------------------------------------------------------ the image encoder (ViT tokens, ResNet)
def vit_b32_one_layer():
    """ViT-B/32's image encoder (224 px, 7x7 patches, width 768, 12 heads) with 1 of its 12 layers: the shapes of
    the released model at a fraction of the cost; encode_image is `visual(image)` for an fp32 model."""
    torch.manual_seed(0)
    return clip.model.VisionTransformer(224, 32, 768, 1, 12, 512).float().eval()


@pytest.mark.parametrize("arch", ["tiny", "ViT-B/32, 1 layer"])
def test_vit_forward_class_token_is_encode_image_bit_for_bit(arch):
    """common.vit_forward (and ImageEncoder, which calls it) gives exactly CLIP's encode_image for the class token,
    in fp32 and under bf16 autocast, with and without tokens=True; the patch tokens are ln_post(z) @ proj."""
    if arch == "tiny":
        model = tiny_clip()
        visual, encode_image = model.visual, model.encode_image
    else:
        visual = vit_b32_one_layer()
        encode_image = visual
    encoder = common.ImageEncoder(visual).eval()
    res = visual.input_resolution
    x = torch.rand(2, 3, res, res, generator=torch.Generator().manual_seed(1))
    z = (x - encoder.mean) / encoder.std
    grid = res // visual.conv1.kernel_size[0]
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            reference = encode_image(z)  # clip's own VisionTransformer.forward
            tokens = encoder(x, tokens=True)
            assert tokens.shape == (2, 1 + grid * grid, visual.output_dim)
            assert torch.equal(encoder(x), reference)
            assert torch.equal(tokens[:, 0], reference), "the class token of tokens=True differs from encode_image"
            if autocast:
                assert reference.dtype == torch.bfloat16
            else:
                assert torch.equal(common.vit_forward(visual, z), reference)
    # the patch tokens: CLIP's transformer output, read with a forward hook, through ln_post and proj by hand
    seen = {}
    hook = visual.transformer.register_forward_hook(lambda m, i, o: seen.update(out=o.permute(1, 0, 2)))
    with torch.no_grad():
        tokens = encoder(x, tokens=True)
    hook.remove()
    by_hand = visual.ln_post(seen["out"]) @ visual.proj  # (B, 1+P, D)
    torch.testing.assert_close(tokens, by_hand, rtol=1e-5, atol=1e-6)


def test_resnet_keeps_its_own_forward_and_has_no_tokens():
    torch.manual_seed(0)
    model = common.CLIP(64, 64, (1, 1, 1, 1), 16, None, 16, 49408, 64, 1, 1).float().eval()  # a tiny ModifiedResNet
    encoder = common.ImageEncoder(model.visual).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(encoder(x), model.encode_image((x - encoder.mean) / encoder.std))
    with pytest.raises(ValueError, match="ViT"):
        encoder(x, tokens=True)


# --------------------------------------------------------------------------------- images without labels (FARE's data)
def test_image_dataset_reads_tables_and_folders_without_labels(tmp_path):
    # a CSV with an image column only; advflyp.py's caption CSV (extra columns are not read); a TSV
    write_images(tmp_path / "web", [f"imgs/{i}.png" for i in range(4)])
    (tmp_path / "web" / "imgs" / "1.png").write_bytes(b"broken")
    (tmp_path / "web" / "paths.csv").write_text("filepath\n" + "".join(f"imgs/{i}.png\n" for i in range(4)))
    (tmp_path / "web" / "pairs.csv").write_text("filepath,title\n" + "".join(f"imgs/{i}.png,\"a, b {i}\"\n"
                                                                              for i in range(4)))
    (tmp_path / "web" / "pairs.tsv").write_text("path\ttext\n" + "".join(f"imgs/{i}.png\tcap {i}\n" for i in range(4)))
    for name, key in (("paths.csv", "filepath"), ("pairs.csv", "filepath"), ("pairs.tsv", "path")):
        ds, source = common.image_dataset(str(tmp_path / "web" / name), 32, img_key=key)
        assert len(ds) == 4 and f"'{key}'" in source
        image, target, unreadable = ds[0]
        assert image.shape == (3, 32, 32) and 0 <= image.min() <= image.max() <= 1 and (target, unreadable) == ("", 0)
        assert ds[1][2] == 1 and torch.equal(ds[1][0], ds[2][0])  # broken: the next readable image stands in
    # an ImageNet root: train/ only, whatever else is beside it
    write_images(tmp_path / "imagenet", ["train/n01/a.JPEG", "train/n01/b.JPEG", "train/n02/c.png", "val/n01/d.JPEG"])
    ds, source = common.image_dataset(str(tmp_path / "imagenet"), 32)
    assert len(ds) == 3 and source.endswith(os.path.join("imagenet", "train"))
    # an img2dataset folder (captions and metadata are not images), an ImageFolder, a flat folder: every image under it
    write_images(tmp_path / "laion", ["00000/000.jpg", "00000/001.jpg", "00001/010.jpg", ".cache/x.jpg"])
    for key in ("00000/000", "00000/001", "00001/010"):
        (tmp_path / "laion" / f"{key}.txt").write_text("a caption")
        (tmp_path / "laion" / f"{key}.json").write_text("{}")
    ds, _ = common.image_dataset(str(tmp_path / "laion"), 32)
    assert [os.path.relpath(p, tmp_path / "laion") for p in ds.dataset.images] == ["00000/000.jpg", "00000/001.jpg",
                                                                                 "00001/010.jpg"]  # sorted, no .cache
    write_images(tmp_path / "flat", ["b.webp", "a.bmp"])
    ds, _ = common.image_dataset(str(tmp_path / "flat"), 32)
    assert [os.path.basename(p) for p in ds.dataset.images] == ["a.bmp", "b.webp"]
    # the demo's images (labels unused) and synthetic images
    demo, source = common.image_dataset("demo", 32)
    assert source == "demo" and len(demo) == 64 * len(common.DEMO_PROXY) and demo[0][0].shape == (3, 32, 32)
    assert len(common.image_dataset("synthetic", 32, synthetic_size=5)[0]) == 5


def test_image_dataset_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("no images here")
    (tmp_path / "cols.csv").write_text("image,caption\na.png,b\n")
    (tmp_path / "header_only.csv").write_text("filepath\n")
    (tmp_path / "binary.tsv").write_bytes(b"\xff\xfe\x00\x81 not text")
    write_images(tmp_path, ["x.png"])
    (tmp_path / "x.png").write_bytes(b"not a png")
    (tmp_path / "unreadable.csv").write_text("filepath\nx.png\nmissing.png\n")
    cases = {
        "empty": "no image files under", "notes": "no image files under", "cols.csv": "no column 'filepath'",
        "header_only.csv": "lists no images", "binary.tsv": "not a readable CSV/TSV file",
        "unreadable.csv": "none of its 2 images can be read", "nowhere": "no such file or directory",
    }
    for name, message in cases.items():
        with pytest.raises(common.UsageError, match=message) as e:
            common.image_dataset(str(tmp_path / name), 32)
        assert "\n" not in str(e.value)


# -------------------------------------------------------------------------------- image-caption pairs (AdvFLYP's data)
def test_csv_tsv_separator_columns_relative_paths_and_broken_images(tmp_path):
    write_images(tmp_path, [f"imgs/{i}.png" for i in range(5)])
    (tmp_path / "imgs" / "2.png").write_bytes(b"not an image")  # unreadable
    rows = [(f"imgs/{i}.png", f"caption, number {i}") for i in range(5)] + [("imgs/missing.png", "gone")]
    (tmp_path / "pairs.csv").write_text("id,filepath,title\n" + "".join(f'{i},{p},"{c}"\n' for i, (p, c) in
                                                                        enumerate(rows)))
    (tmp_path / "pairs.tsv").write_text("path\ttext\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    csv_set = common.caption_dataset(str(tmp_path / "pairs.csv"), 32)  # comma from the extension
    tsv_set = common.caption_dataset(str(tmp_path / "pairs.tsv"), 32, img_key="path", caption_key="text")  # tab
    for ds in (csv_set, tsv_set):
        assert len(ds) == 6
        # resolved against the file's folder
        assert ds.dataset.images[0] == os.path.join(str(tmp_path), "imgs", "0.png")
        image, caption, broken = ds[0]
        assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1
        assert (caption, broken) == ("caption, number 0", 0)
        assert ds[2][1:] == ("caption, number 3", 1)  # broken: the next readable pair stands in
        assert ds[5][1:] == ("caption, number 0", 1)  # missing file at the end: wraps around
        assert sum(ds[i][2] for i in range(len(ds))) == 2
    with pytest.raises(common.UsageError, match="no column 'filepath'"):
        common.caption_dataset(str(tmp_path / "pairs.tsv"), 32)
    with pytest.raises(common.UsageError, match="'title'"):
        common.caption_dataset(str(tmp_path / "pairs.csv"), 32, separator="\t")
    (tmp_path / "bad.csv").write_text("filepath,title\nimgs/2.png,a\nimgs/missing.png,b\n")
    with pytest.raises(common.UsageError, match="none of its 2 images can be read"):
        common.caption_dataset(str(tmp_path / "bad.csv"), 32)


def test_img2dataset_folder(tmp_path):
    write_images(tmp_path, ["00000/000000000.jpg", "00000/000000001.jpg", "00001/000010000.jpg",
                            "00001/000010001.jpg"])
    for key, caption in (("00000/000000000", "first"), ("00000/000000001", "second"), ("00001/000010000", "third")):
        (tmp_path / f"{key}.txt").write_text(caption + "\n")
    (tmp_path / "00000" / "000000001.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    (tmp_path / "00000_stats.json").write_text("{}")  # img2dataset's other outputs are ignored
    said = []
    ds = common.caption_dataset(str(tmp_path), 32, log=said.append)
    assert len(ds) == 3  # 00001/000010001.jpg has no caption file: counted, said
    assert said == [f"--data {tmp_path}: 1 image without a caption file beside it left out, 3 with one"]
    assert [ds[i][1:] for i in range(3)] == [("first", 0), ("third", 1), ("third", 0)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UsageError, match="no image with a caption file"):
        common.caption_dataset(str(tmp_path / "empty"), 32)


def write_laion_release(root, parts=2, per_part=3):
    """The AdvFLYP LAION release's layout: partX/images/NNNNNN.jpg with partX/captions/NNNNNN.txt."""
    write_images(root, [f"part{p}/images/{i:06d}.jpg" for p in range(parts) for i in range(per_part)])
    for p in range(parts):
        os.makedirs(root / f"part{p}" / "captions")
        for i in range(per_part):
            (root / f"part{p}" / "captions" / f"{i:06d}.txt").write_text(f"web caption {p}-{i}\n")


def test_advflyp_laion_release_with_and_without_its_index(tmp_path):
    """Without laion_index.json: every image with its captions/ file, in path order; with it: its records, in its
    order (the official loader's first N are then --subset N --subset-order first); a .jsonl of records (the
    VLM-captioned ImageNet of the paper's Table 14) reads the same way; a bad index is one line."""
    write_laion_release(tmp_path / "laion")
    (tmp_path / "laion" / "part1" / "captions" / "000002.txt").unlink()  # an image without its caption
    said = []
    ds = common.caption_dataset(str(tmp_path / "laion"), 32, log=said.append)
    assert [ds[i][1] for i in range(len(ds))] == ["web caption 0-0", "web caption 0-1", "web caption 0-2",
                                                  "web caption 1-0", "web caption 1-1"]
    assert said and "1 image without a caption file" in said[0]
    records = [{"image": f"part{p}/images/{i:06d}.jpg", "caption": f"indexed {p}-{i}"} for p, i in
               ((1, 1), (0, 2), (0, 0))]
    (tmp_path / "laion" / common.LAION_INDEX).write_text(json.dumps(records))
    ds = common.caption_dataset(str(tmp_path / "laion"), 32)
    assert len(ds) == 3 and [ds[i][1] for i in range(3)] == ["indexed 1-1", "indexed 0-2", "indexed 0-0"]
    assert ds.dataset.images[0] == os.path.join(str(tmp_path / "laion"), "part1", "images", "000001.jpg")
    first_two = common.take_subset(ds, Namespace(subset=2, subset_per_class=None, subset_order="first", data="x"))
    assert [first_two[i][1] for i in range(2)] == ["indexed 1-1", "indexed 0-2"]
    jsonl = tmp_path / "captioned.jsonl"
    jsonl.write_text("".join(json.dumps({"image": str(tmp_path / "laion" / r["image"]),
                                         "caption": "vlm " + r["caption"]}) + "\n" for r in records))
    assert common.caption_dataset(str(jsonl), 32)[2][1] == "vlm indexed 0-0"  # absolute paths kept as they are
    assert len(common.image_dataset(str(jsonl), 32)[0]) == 3  # FARE reads the images of the same file
    (tmp_path / "laion" / common.LAION_INDEX).write_text('[{"image": "part0/images/000000.jpg"}]')
    with pytest.raises(common.UsageError, match=r'laion_index.json: not a list of \{"image": path, "caption": text'):
        common.caption_dataset(str(tmp_path / "laion"), 32)


def test_subset_indices_sizes_classes_order_and_seed():
    """--subset / --subset-per-class: the sizes asked for, within each class, sorted, the same every time and for
    any --seed (the generator's seed is fixed), the first ones with first=True; a class too small is kept whole."""
    labels = [i % 5 for i in range(100)] + [5, 5]  # 5 classes of 20, one of 2
    random = common.subset_indices(102, size=30)
    assert len(random) == len(set(random)) == 30 and random == sorted(random) == common.subset_indices(102, size=30)
    assert random != list(range(30)) and common.subset_indices(102, size=30, first=True) == list(range(30))
    assert random != common.subset_indices(102, size=30, seed=1)
    per_class = common.subset_indices(102, per_class=4, labels=labels)
    counts = np.bincount([labels[i] for i in per_class])
    assert counts.tolist() == [4, 4, 4, 4, 4, 2] and per_class == sorted(per_class)
    assert common.subset_indices(102, per_class=4, labels=labels, first=True)[:4] == [0, 1, 2, 3]


def test_take_subset_classes_of_each_reader_and_errors(tmp_path):
    write_images(tmp_path / "tree", [f"{c}/{i}.png" for c in ("ant", "bee", "cow") for i in range(5)])
    args = lambda **k: Namespace(**{"subset": None, "subset_per_class": None, "subset_order": "random",  # noqa: E731
                                    "data": "D", **k})
    labelled, _ = common.training_dataset(str(tmp_path / "tree"), 32)
    images, _ = common.image_dataset(str(tmp_path / "tree"), 32)
    demo, _ = common.training_dataset("demo", 32)
    said = []
    for ds, folder_labels in ((labelled, labelled.dataset.targets), (images, None)):
        kept = common.take_subset(ds, args(subset_per_class=2), said.append)
        assert len(kept) == 6 and isinstance(kept, common.SkipUnreadable)
        chosen = kept.dataset.indices
        classes = [folder_labels[i] for i in chosen] if folder_labels else [images.dataset.images[i].split(os.sep)[-2]
                                                                             for i in chosen]
        assert sorted(collections.Counter(classes).values()) == [2, 2, 2]
    assert said[0] == ("training on 6 of the 15 samples of --data D (--subset-per-class 2, 3 classes, a fixed random "
                       "choice)")
    assert common.class_labels(demo.dataset)[:3] == [0, 1, 2] and common.take_subset(demo, args()) is demo
    pairs = common.caption_dataset("synthetic", 32, synthetic_size=8)
    with pytest.raises(common.UsageError, match="--subset-per-class: --data D has no classes"):
        common.take_subset(pairs, args(subset_per_class=1))
    with pytest.raises(common.UsageError, match="--subset 9: --data D has only 8 samples"):
        common.take_subset(pairs, args(subset=9))
    parser = common.train_parser("", "agft", lr=1e-3)
    for argv, message in ((["--subset", "0"], "--subset 0: must be >= 1"),
                          (["--subset", "3", "--subset-per-class", "1"], "choose one")):
        with pytest.raises(common.UsageError, match=message):
            common.parse_train_args(parser, ["--data", "synthetic", *argv])


def test_synthetic_and_demo_captions():
    image, caption, broken = common.caption_dataset("synthetic", 32, synthetic_size=4)[1]
    assert image.shape == (3, 32, 32) and caption.startswith("a photo of a class ") and broken == 0
    demo = common.caption_dataset("demo", 32)
    assert len(demo) == 64 * len(common.DEMO_PROXY)
    image, caption, broken = demo[5]
    colour, shape = common.DEMO_PROXY[5]
    assert colour in caption and shape in caption and broken == 0


def test_a_single_class_is_refused_for_training_and_evaluation(tmp_path, tiny_ckpt, capsys):
    """With one class every image is classified 'correctly' and the loss is 0: refused in one line, nothing written."""
    write_images(tmp_path / "one", ["cat/0.png", "cat/1.png"])
    with pytest.raises(common.UsageError, match="has 1 class .cat.; zero-shot classification needs at least two"):
        common.training_dataset(str(tmp_path / "one"), 32)
    with pytest.raises(common.UsageError, match="one: has 1 class"):
        eval_datasets.eval_dataset(f"folder:{tmp_path / 'one'}", ".", 32)
    out = tmp_path / "run"
    code, _, err = run_main_in_process(agft.main, ["--model", tiny_ckpt, "--data", str(tmp_path / "one"), "--workers",
                                                   "0", "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "needs at least two" in err and not out.exists()


def test_eps_0_or_no_attack_steps_is_clean_fine_tuning_and_says_so(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """--eps 0 or --attack-steps 0: x_adv is x, no attack pass is made, the run says so; both give the same model."""
    calls, grad = [], common.input_grad
    monkeypatch.setattr(common, "input_grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    base = ["--model", tiny_ckpt, "--data", "synthetic", "--synthetic-size", "8", "--batch-size", "4", "--lr", "0.05",
            "--warmup", "1", "--workers", "0"]
    weights = []
    for name, extra in (("eps", ["--eps", "0"]), ("steps", ["--eps", "4", "--attack-steps", "0"])):
        out = tmp_path / name
        code, stdout, err = run_main_in_process(agft.main, [*base, *extra, "--out", str(out)], capsys)
        assert code == 0 and "clean fine-tuning, no adversarial images" in stdout, err
        weights.append(torch.load(out / "last.pt", weights_only=True)["model"])
    assert calls == [] and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    code, _, err = run_main_in_process(agft.main, [*base, "--synthetic-size", "0", "--out", str(tmp_path / "z")],
                                       capsys)
    assert code == 2 and "--synthetic-size 0: must be >= 1" in err


def test_workers_never_exceed_the_cpus_and_model_pt_is_written_without_warnings(tiny_ckpt, tmp_path, capsys):
    import warnings
    cpus = len(os.sched_getaffinity(0))
    loader = common.make_loader(common.SyntheticImages(4, 2, 32), [[0, 1], [2, 3]], cpus + 7, torch.device("cpu"))
    assert loader.num_workers == cpus
    code, _, err = run_main_in_process(agft.main, ["--model", tiny_ckpt, "--data", "synthetic", "--workers", "-1",
                                                   "--out", str(tmp_path / "w")], capsys)
    assert code == 2 and "--workers -1: must be >= 0" in err and not (tmp_path / "w").exists()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        common.save_torchscript(tiny_clip(), str(tmp_path / "model.pt"))
    assert [str(w.message) for w in seen if issubclass(w.category, FutureWarning)] == []


def test_a_run_shorter_than_its_warm_up_says_so(tiny_ckpt, tmp_path, capsys):
    code, stdout, _ = run_main_in_process(agft.main, ["--model", tiny_ckpt, "--data", "synthetic", "--synthetic-size",
                                                      "8", "--batch-size", "4", "--max-steps", "2", "--workers", "0",
                                                      "--out", str(tmp_path / "run")], capsys)
    assert code == 0 and "--warmup 1000 is not below the run's 2 steps: the learning rate rises" in stdout


def test_out_below_a_file_is_a_one_line_error(tiny_ckpt, tmp_path, capsys):
    import evaluate
    (tmp_path / "afile").write_text("x")
    for main, argv in ((agft.main, ["--model", tiny_ckpt, "--data", "synthetic"]),
                       (evaluate.main, ["--model", tiny_ckpt, "--datasets", "demo"])):
        out = tmp_path / "afile" / "below" / "r.json"
        code, _, err = run_main_in_process(main, [*argv, "--workers", "0", "--out", str(out)], capsys)
        assert code == 2 and err == f"error: --out {out}: {tmp_path / 'afile'} is a file, not a folder\n", err
    assert (tmp_path / "afile").read_text() == "x"


def test_a_folder_without_one_readable_image_is_refused_before_anything_is_written(tiny_ckpt, tmp_path, capsys):
    import tecoa
    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "data" / c / f"{i}.jpg").write_bytes(b"not an image")
    for main in (agft.main, tecoa.main):
        out = tmp_path / "run"
        code, _, err = run_main_in_process(main, ["--model", tiny_ckpt, "--data", str(tmp_path / "data"), "--workers",
                                                  "0", "--out", str(out)], capsys)
        assert code == 2 and err == f"error: --data {tmp_path / 'data'}: none of its 4 images can be read\n", err
        assert not out.exists()


def test_the_fp16_guard_scales_even_the_smallest_gradients_to_a_finite_number():
    """The per-image factor 2^k of the fp16 attack guard (common._ScaleGradPerSample) brings each image's peak to
    [1, 2); for a peak below 2^-127 (an image about 90 logits from the boundary) 2^k would be inf in fp32 and the
    image's fp16 gradient NaN, so k stops at 127: the image still moves, and dividing by the same factor is exact."""
    state = {}
    features = torch.zeros(3, 4, dtype=torch.float16, requires_grad=True)
    out = common._ScaleGradPerSample.apply(features, state)
    grad = torch.tensor([[2.0 ** -140, 0, 0, 0], [3.0 * 2.0 ** -10, 0, 0, 0], [0, 0, 0, 0]])  # fp32, a subnormal peak
    back, = torch.autograd.grad(out, features, grad)
    assert torch.isfinite(state["scale"]).all() and state["scale"].tolist() == [2.0 ** 127, 2.0 ** 9, 1.0]
    assert back[0, 0] == 2.0 ** -13 and back[1, 0] == 1.5 and back.dtype == torch.float16
