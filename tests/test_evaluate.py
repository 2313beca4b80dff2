"""evaluate.py and the evaluation-dataset registry of common.py (docs/datasets.md): clean accuracy against an
independent computation, 1 vs 2 processes, results.json and the Markdown table, every registry name wired to a loader,
template and class list (checked on small fakes of each format), and one-line errors for bad input."""
import json
import os
import pickle

import clip
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import attacks
import common
import eval_datasets
import evaluate
from conftest import demo_zero_shot, run_main_in_process, run_script, tiny_clip, zero_shot_eval

# docs/evaluation.md, written out again here so that a changed data_lists/templates.tsv fails a test
SPEC_TEMPLATES = {
    "Caltech101": "A photo of a {}.", "Caltech256": "A photo of a {}.", "CIFAR10": "This is a photo of a {}.",
    "CIFAR100": "This is a photo of a {}.", "STL10": "This is a photo of a {}.", "SUN397": "This is a photo of a {}.",
    "ImageNet": "This is a photo of a {}.", "ImageNet-R": "This is a photo of a {}.",
    "ImageNet-Sketch": "This is a photo of a {}.", "ImageNet-A": "This is a photo of a {}.",
    "TinyImageNet": "This is a photo of a {}.", "Country211": "A photo I took in {}.",
    "DTD": "A surface with a {} texture.", "EuroSAT": "A centered satellite photo of {}.",
    "FGVCAircraft": "A photo of a {}, a type of aircraft.", "Flowers102": "A photo of a {}, a type of flower.",
    "Food101": "A photo of {}, a type of food.", "OxfordIIITPet": "A photo of a {}, a type of pet.",
    "PCAM": "This is a photo of {}.", "StanfordCars": "A photo of a {}.",
    "ObjectNet": "This is a photo of a {}.",  # not in the AGFT set: AdvFLYP's App. 6 ("the same prompt as ImageNet")
}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_image(path, seed, size=(40, 36), mode="RGB"):
    """A small random image file (format from the extension)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


def make_folder(root, counts):
    """ImageFolder layout: {class folder: number of PNGs}."""
    k = 0
    for cls, n in counts.items():
        for i in range(n):
            write_image(os.path.join(root, cls, f"img{i}.png"), seed=k, size=(40 + k % 5, 36 + k % 3))
            k += 1
    return str(root)


def run_in_process(argv, capsys):
    return run_main_in_process(evaluate.main, argv, capsys)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three classes, 7 images (odd, so 2 processes get 4 and 3), and a 2-class folder."""
    root = tmp_path_factory.mktemp("data")
    three = make_folder(root / "shapes", {"red_ring": 3, "green-bar": 2, "Blue Cross": 2})
    two = make_folder(root / "pair", {"cat": 2, "dog": 3})
    return three, two


# --------------------------------------------------------------------------------------------------- accuracy
def independent_clean_accuracy(folder, template):
    """Clean zero-shot accuracy (%) with nothing from common.py: PIL, torchvision transforms, clip's encoders; and the
    smallest gap between an image's two best cosine similarities (where it is above float rounding, every
    prediction, hence the accuracy, is the same however the evaluation batches and rounds)."""
    from torchvision import transforms
    model = tiny_clip()  # the weights of the tiny_ckpt fixture
    classes = sorted(os.listdir(folder))
    names = [c.replace("_", " ").replace("-", " ").lower() for c in classes]
    tokens = clip.tokenize([template.format(n) for n in names], context_length=model.context_length)
    prep = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(32), transforms.ToTensor()])
    mean, std = torch.tensor(common.CLIP_MEAN).view(3, 1, 1), torch.tensor(common.CLIP_STD).view(3, 1, 1)
    correct = total = 0
    gap = float("inf")
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokens), dim=-1)
        for label, c in enumerate(classes):
            for f in sorted(os.listdir(os.path.join(folder, c))):
                x = (prep(Image.open(os.path.join(folder, c, f)).convert("RGB")) - mean) / std
                sim = F.normalize(model.encode_image(x[None]), dim=-1)[0] @ text.t()  # (C,)
                top2 = sim.topk(2).values
                gap = min(gap, (top2[0] - top2[1]).item())
                correct, total = correct + (sim.argmax().item() == label), total + 1
    return 100.0 * correct / total, total, gap


def test_clean_accuracy_matches_an_independent_computation(tiny_ckpt, folders, tmp_path, capsys):
    three, _ = folders
    out = tmp_path / "r.json"
    code, stdout, _ = run_in_process(["--model", tiny_ckpt, "--datasets", f"folder:{three}", "--attacks", "pgd",
                                      "--steps", "2", "--workers", "0", "--out", str(out)], capsys)
    assert code == 0
    r = json.loads(out.read_text())["datasets"]["shapes"]
    expected, n, gap = independent_clean_accuracy(three, "This is a photo of a {}.")
    assert gap > 1e-4  # far above float32 rounding of a cosine similarity (~1e-7): no prediction is a near-tie
    assert r["n"] == n == 7
    assert r["clean"] == round(expected, 2)
    assert 0 <= r["pgd"] <= r["clean"]
    # --template reaches the prompts (another --out: a rerun with other settings would refuse to overwrite)
    out = tmp_path / "template.json"
    code, _, _ = run_in_process(["--model", tiny_ckpt, "--datasets", f"folder:{three}", "--attacks", "none",
                                 "--template", "a {} thing", "--workers", "0", "--out", str(out)], capsys)
    report = json.loads(out.read_text())
    expected, _, gap = independent_clean_accuracy(three, "a {} thing")
    assert gap > 1e-4 and report["datasets"]["shapes"]["clean"] == round(expected, 2)
    assert report["settings"]["templates"]["shapes"] == "a {} thing"


def test_training_scripts_accuracy_equals_evaluate_py():
    """common.zero_shot_accuracy (the demo's tables, AdvFLYP's validation: clean and PGD only) and evaluate.py's
    zero_shot_eval give the same numbers, exactly: the same batches, the same attack on the same clean-correct
    images with the same per-image random starts, the same ops."""
    _, text, ds, _ = demo_zero_shot(4)
    encoder = common.ImageEncoder(common.load_clip("demo").visual).eval()
    dist = common.Dist(0, 1, 0, torch.device("cpu"))
    mine = common.zero_shot_accuracy(encoder, text, ds, dist, 4 / 255, 1 / 255, 3, batch_size=16, seed=1)
    full = zero_shot_eval(encoder, text, ds, dist, ("pgd",), 4 / 255, 1 / 255, 3, batch_size=16, seed=1)
    assert mine == full and 0 < mine["pgd"] < mine["clean"]


@pytest.mark.slow
def test_one_process_equals_two(tiny_ckpt, folders, tmp_path):
    """Every sample counted once with 2 processes on 7 images, and the same numbers as one process, exactly: rank r
    takes batches r, r + 2, ... of the same list of batches, so each image is evaluated in the same batch, through
    the same ops at the same thread count, whatever the number of processes."""
    three, _ = folders
    results = []
    for nproc in (1, 2):
        out = tmp_path / f"r{nproc}.json"
        p = run_script(["evaluate.py", "--model", tiny_ckpt, "--datasets", f"folder:{three}", "--attacks",
                        "pgd,apgd-ce,aa,pgd-t-rand", "--steps", "2", "--eps", "8", "--batch-size", "2", "--workers",
                        "0", "--out", str(out)], nproc=nproc)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "Traceback" not in p.stderr
        report = json.loads(out.read_text())
        assert report["settings"]["processes"] == nproc
        results.append(report["datasets"])
    assert results[0]["shapes"]["n"] == results[1]["shapes"]["n"] == 7
    assert results[0] == results[1]


def test_attack_all_gives_the_same_accuracies(tiny_ckpt, folders, tmp_path, capsys):
    """--attack-all (for benchmarks) also attacks the clean-misclassified images; a sample still counts as robust
    only if it is correct clean, and random starts follow the sample's index, so the accuracies do not change.
    --batch-size 1: each image is attacked alone in both runs, so the arithmetic, hence every bit, is the same (with
    larger batches the attacked batches differ, and so can the rounding: test_attack_does_not_depend_on_batching)."""
    three, _ = folders
    results = []
    for extra in ([], ["--attack-all"]):
        out = tmp_path / f"r{len(extra)}.json"
        code, _, _ = run_in_process(["--model", tiny_ckpt, "--datasets", f"folder:{three}", "--attacks", "pgd,aa",
                                     "--steps", "3", "--eps", "8", "--batch-size", "1", "--workers", "0",
                                     "--out", str(out), *extra], capsys)
        assert code == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["datasets"] == results[1]["datasets"]
    assert 0 < results[0]["datasets"]["shapes"]["clean"] < 100  # some images are skipped without --attack-all
    assert results[1]["settings"]["attack_all"] and not results[0]["settings"]["attack_all"]


def test_results_json_and_markdown_table(tiny_ckpt, folders, tmp_path, capsys):
    """Two datasets, one with 2 classes: apgd-dlr is null there and left out of its mean; the table has the
    datasets as columns, the settings as rows and the average last."""
    three, two = folders
    out = tmp_path / "sub" / "results.json"
    code, stdout, _ = run_in_process(["--model", tiny_ckpt, "--datasets", f"folder:{three},folder:{two}",
                                      "--attacks", "pgd,apgd-dlr,aa", "--steps", "2", "--eps", "4", "--workers", "0",
                                      "--out", str(out)], capsys)
    assert code == 0
    report = json.loads(out.read_text())
    shapes, pair = report["datasets"]["shapes"], report["datasets"]["pair"]
    assert set(shapes) == {"n", "clean", "pgd", "apgd-dlr", "aa"} and (shapes["n"], pair["n"]) == (7, 5)
    assert pair["apgd-dlr"] is None and shapes["apgd-dlr"] is not None
    mean = report["mean"]
    assert mean["clean"] == round((shapes["clean"] + pair["clean"]) / 2, 2)
    assert mean["pgd"] == round((shapes["pgd"] + pair["pgd"]) / 2, 2)
    assert mean["apgd-dlr"] == shapes["apgd-dlr"]
    assert any("apgd-dlr" in n and "pair" in n for n in report["notes"])
    assert report["settings"]["steps"] == {"pgd": 2, "apgd-dlr": 2, "aa": 2} and report["settings"]["eps"] == 4

    md = (tmp_path / "sub" / "results.md").read_text()
    assert md in stdout
    rows = [line for line in md.splitlines() if line.startswith("|")]
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    assert cells(rows[0]) == ["", "shapes", "pair", "Average"]
    labels = [cells(r)[0] for r in rows[2:]]
    assert labels == ["images", "clean", "PGD-2", "APGD-DLR-2", "AA (APGD-CE + APGD-DLR, 2 it.)"]
    assert cells(rows[3]) == ["clean", f"{shapes['clean']:.2f}", f"{pair['clean']:.2f}", f"{mean['clean']:.2f}"]
    assert cells(rows[5]) == ["APGD-DLR-2", f"{shapes['apgd-dlr']:.2f}", "n/a", f"{mean['apgd-dlr']:.2f}*"]
    assert "* mean over the datasets where the attack applies" in md


def test_samples_is_a_fixed_subset(tiny_ckpt, folders, tmp_path, capsys):
    three, _ = folders
    ds = common.image_folder(three, common.image_transform(32))[0]
    a, b = evaluate.fixed_subset(ds, 4, 0), evaluate.fixed_subset(ds, 4, 0)
    assert a.indices == b.indices and len(a) == 4 and a.indices == sorted(a.indices)
    assert evaluate.fixed_subset(ds, 4, 1).indices != a.indices or evaluate.fixed_subset(ds, 4, 2).indices != a.indices
    assert evaluate.fixed_subset(ds, 100, 0) is ds
    out = tmp_path / "r.json"
    code, _, _ = run_in_process(["--model", tiny_ckpt, "--datasets", f"folder:{three}", "--attacks", "none",
                                 "--samples", "3", "--workers", "0", "--out", str(out)], capsys)
    assert code == 0 and json.loads(out.read_text())["datasets"]["shapes"]["n"] == 3


def test_demo_dataset_is_the_demo_held_out_set():
    name, ds, names, template = eval_datasets.eval_dataset("demo", "unused", 32)
    assert name == "demo" and len(ds) == 512 and len(names) == 16 and template == "This is a photo of a {}."
    assert names == [f"{c} {s}" for c, s in common.DEMO_HELD_OUT]
    assert torch.equal(ds[5][0], common.DemoImages(common.DEMO_HELD_OUT, 32, 32, seed=2)[5][0])


# --------------------------------------------------------------------------------------------------- registry
def test_registry_names_templates_and_the_paper_set():
    assert set(eval_datasets.EVAL_DATASETS) == set(SPEC_TEMPLATES)
    templates = common.read_data_list("templates.tsv")
    for name, template in SPEC_TEMPLATES.items():
        assert templates[name] == template
    assert eval_datasets.AGFT_DATASETS == ("Caltech101", "Caltech256", "CIFAR10", "CIFAR100", "DTD", "EuroSAT",
                                    "FGVCAircraft", "Flowers102", "Food101", "ImageNet", "OxfordIIITPet", "PCAM",
                                    "StanfordCars", "STL10", "SUN397")
    iso = common.read_data_list("iso3166.tsv")
    assert len(iso) == 250 and iso["US"] == "United States" and iso["DE"] == "Germany"


@pytest.mark.parametrize("name", list(SPEC_TEMPLATES))
def test_missing_dataset_says_what_to_put_where(name, tmp_path):
    with pytest.raises(common.UsageError) as e:
        eval_datasets.eval_dataset(name, str(tmp_path), 32)
    message = str(e.value)
    assert "\n" not in message and name in message and str(tmp_path) in message
    assert ("--download" in message) == eval_datasets.EVAL_DATASETS[name][3]
    assert not any(tmp_path.iterdir())  # nothing created in the user's data root


def fake_cifar(root, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # the fakes have no official md5
    rng = np.random.default_rng(0)
    os.makedirs(root / "cifar-10-batches-py")
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [2, 0, 1]}, f)
    with open(root / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird"]}, f)
    os.makedirs(root / "cifar-100-python")
    with open(root / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "fine_labels": [1, 0]}, f)
    with open(root / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["apple", "aquarium_fish"]}, f)


def fake_stl10(root, monkeypatch):
    import torchvision.datasets.stl10 as tv_stl10
    monkeypatch.setattr(tv_stl10, "check_integrity", lambda *a, **k: True)
    base = root / "stl10_binary"
    os.makedirs(base)
    np.random.default_rng(0).integers(0, 256, (2, 3, 96, 96), dtype=np.uint8).tofile(base / "test_X.bin")
    np.array([1, 2], dtype=np.uint8).tofile(base / "test_y.bin")
    (base / "class_names.txt").write_text("airplane\nbird\n")


def fake_files(root):
    """The on-disk formats that need no special library, each with a few images."""
    j = lambda *p: str(root.joinpath(*p))  # noqa: E731
    for c in ("BACKGROUND_Google", "Faces_easy", "yin_yang"):
        write_image(j("caltech101", "101_ObjectCategories", c, "image_0001.jpg"), 1)
    for c in ("001.ak47", "251.airplanes-101", "257.clutter"):
        write_image(j("caltech256", "256_ObjectCategories", c, f"{c[:3]}_0001.jpg"), 2)
    os.makedirs(j("dtd", "dtd", "labels"))
    with open(j("dtd", "dtd", "labels", "test1.txt"), "w") as f:
        for c in ("banded", "zig_zagged"):
            write_image(j("dtd", "dtd", "images", c, f"{c}_0001.jpg"), 3)
            f.write(f"{c}/{c}_0001.jpg\n")
    for c in ("AnnualCrop", "SeaLake"):
        write_image(j("eurosat", "2750", c, f"{c}_1.jpg"), 4)
    data = j("fgvc-aircraft-2013b", "data")
    write_image(os.path.join(data, "images", "0001.jpg"), 5)
    write_image(os.path.join(data, "images", "0002.jpg"), 6)
    with open(os.path.join(data, "variants.txt"), "w") as f:
        f.write("707-320\nA300B4\n")
    with open(os.path.join(data, "images_variant_test.txt"), "w") as f:
        f.write("0001 A300B4\n0002 707-320\n")
    write_image(j("food-101", "images", "apple_pie", "1.jpg"), 7)
    write_image(j("food-101", "images", "baby_back_ribs", "2.jpg"), 8)
    os.makedirs(j("food-101", "meta"))
    with open(j("food-101", "meta", "test.json"), "w") as f:
        json.dump({"apple_pie": ["apple_pie/1"], "baby_back_ribs": ["baby_back_ribs/2"]}, f)
    os.makedirs(j("oxford-iiit-pet", "annotations"))
    with open(j("oxford-iiit-pet", "annotations", "test.txt"), "w") as f:
        f.write("Abyssinian_1 1 1 1\namerican_bulldog_7 2 2 1\n")
    write_image(j("oxford-iiit-pet", "images", "Abyssinian_1.jpg"), 9)
    write_image(j("oxford-iiit-pet", "images", "american_bulldog_7.jpg"), 10)
    os.makedirs(j("SUN397"))
    with open(j("SUN397", "ClassName.txt"), "w") as f:
        f.write("/a/abbey\n/b/balcony/exterior\n")
    write_image(j("SUN397", "a", "abbey", "sun_a.jpg"), 11)
    write_image(j("SUN397", "b", "balcony", "exterior", "sun_b.jpg"), 12)
    for c in ("AD", "US"):
        write_image(j("country211", "test", c, "1.jpg"), 13)
    wnids = {"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish", "Carassius auratus"),
             "n02085620": ("Chihuahua",)}
    os.makedirs(j("imagenet"))
    torch.save((wnids, ["n01440764"]), j("imagenet", "meta.bin"))  # torchvision's parsed devkit
    for w in wnids:
        write_image(j("imagenet", "val", w, "ILSVRC2012_val_1.JPEG"), 14, mode="L")
    for folder in ("imagenet-r", "imagenet-a", "imagenet-sketch"):
        for w in ("n01443537", "n02085620"):
            write_image(j(folder, w, "a.jpg"), 15)
    tiny = j("tiny-imagenet-200")
    write_image(os.path.join(tiny, "val", "images", "val_0.JPEG"), 16, size=(64, 64))
    write_image(os.path.join(tiny, "val", "images", "val_1.JPEG"), 17, size=(64, 64))
    with open(os.path.join(tiny, "wnids.txt"), "w") as f:
        f.write("n01443537\nn01440764\n")
    with open(os.path.join(tiny, "words.txt"), "w") as f:
        f.write("n01440764\ttench, Tinca tinca\nn01443537\tgoldfish, Carassius auratus\nn09999999\tother\n")
    with open(os.path.join(tiny, "val", "val_annotations.txt"), "w") as f:
        f.write("val_0.JPEG\tn01443537\t0\t0\t10\t10\nval_1.JPEG\tn01440764\t1\t2\t30\t40\n")


# name: (refined class names, number of images)
EXPECTED = {
    "Caltech101": (["faces easy", "yin yang"], 2),
    "Caltech256": (["ak47", "airplanes", "clutter"], 3),
    "CIFAR10": (["airplane", "automobile", "bird"], 3),
    "CIFAR100": (["apple", "aquarium fish"], 2),
    "STL10": (["airplane", "bird"], 2),
    "DTD": (["banded", "zig zagged"], 2),
    "EuroSAT": (["annual crop land", "sea or lake"], 2),
    "FGVCAircraft": (["707 320", "a300b4"], 2),
    "Food101": (["apple pie", "baby back ribs"], 2),
    "OxfordIIITPet": (["abyssinian", "american bulldog"], 2),
    "SUN397": (["abbey", "balcony exterior"], 2),
    "Country211": (["andorra", "united states"], 2),
    "ImageNet": (["tench", "goldfish", "chihuahua"], 3),
    "ImageNet-R": (["goldfish", "chihuahua"], 2),
    "ImageNet-A": (["goldfish", "chihuahua"], 2),
    "ImageNet-Sketch": (["goldfish", "chihuahua"], 2),
    "TinyImageNet": (["tench", "goldfish"], 2),
}


def test_registry_reads_each_format(tmp_path, monkeypatch):
    fake_cifar(tmp_path, monkeypatch)
    fake_stl10(tmp_path, monkeypatch)
    fake_files(tmp_path)
    for name, (names, n) in EXPECTED.items():
        got_name, ds, got_names, template = eval_datasets.eval_dataset(name, str(tmp_path), 32)
        assert (got_name, got_names, len(ds), template) == (name, names, n, SPEC_TEMPLATES[name]), name
        labels = []
        for i in range(len(ds)):
            image, label = ds[i]
            labels.append(label)
            native = {"CIFAR10": 32, "CIFAR100": 32, "STL10": 96}.get(name, 32)  # else Resize+CenterCrop(32)
            assert image.shape == (3, native, native) and image.dtype == torch.float32, name
            assert 0 <= image.min() and image.max() <= 1
        assert all(0 <= label < len(names) for label in labels), name
    # labels follow the files: TinyImageNet's val_1 is a tench (class 0 in sorted wnid order)
    assert [eval_datasets.eval_dataset("TinyImageNet", str(tmp_path), 32)[1][i][1] for i in (0, 1)] == [1, 0]
    assert [eval_datasets.eval_dataset("FGVCAircraft", str(tmp_path), 32)[1][i][1] for i in (0, 1)] == [1, 0]


def test_wordnet_ids_need_the_devkit_or_a_class_name_file(tmp_path):
    fake_files(tmp_path)
    os.remove(tmp_path / "imagenet" / "meta.bin")
    with pytest.raises(common.UsageError, match="ILSVRC2012_devkit_t12.tar.gz"):
        eval_datasets.eval_dataset("ImageNet-R", str(tmp_path), 32)
    table = tmp_path / "names.txt"
    table.write_text("n01443537 gold fish\nn02085620 chihuahua dog\n")
    assert eval_datasets.eval_dataset("ImageNet-R", str(tmp_path), 32, class_names_file=str(table))[2] == \
        ["gold fish", "chihuahua dog"]
    plain = tmp_path / "plain.txt"
    plain.write_text("first\nsecond\n")
    assert eval_datasets.eval_dataset("ImageNet-A", str(tmp_path), 32, class_names_file=str(plain))[2] == ["first", "second"]
    with pytest.raises(common.UsageError, match="has 2 names"):  # ImageNet/val has 3 classes
        eval_datasets.eval_dataset("ImageNet", str(tmp_path), 32, class_names_file=str(plain))
    table.write_text("n01443537 gold fish\n")
    with pytest.raises(common.UsageError, match="n02085620"):
        eval_datasets.eval_dataset("ImageNet-A", str(tmp_path), 32, class_names_file=str(table))
    # folder:PATH with WordNet-id folders goes through the same names
    assert eval_datasets.eval_dataset(f"folder:{tmp_path / 'imagenet-r'}", str(tmp_path), 32,
                               class_names_file=str(plain))[0] == "imagenet-r"


def fake_mat_and_h5(root, monkeypatch):
    """Flowers102 and StanfordCars (MATLAB .mat files, read with scipy) and PCAM (HDF5, read with h5py), in the
    layouts torchvision reads, each with a few images."""
    import h5py
    from scipy.io import savemat
    import torchvision.datasets.flowers102 as tv_flowers
    monkeypatch.setattr(tv_flowers, "check_integrity", lambda *a, **k: True)  # the fakes have no official md5
    flowers = root / "flowers-102"
    for i in (1, 2, 3):
        write_image(str(flowers / "jpg" / f"image_{i:05d}.jpg"), 20 + i)
    savemat(flowers / "imagelabels.mat", {"labels": np.array([[77, 1, 102]])})  # 1-based, per image id
    savemat(flowers / "setid.mat", {"trnid": np.array([[2]]), "valid": np.array([[2]]), "tstid": np.array([[3, 1]])})
    cars = root / "stanford_cars"
    os.makedirs(cars / "devkit")
    savemat(cars / "devkit" / "cars_meta.mat",
            {"class_names": np.array(["AM General Hummer SUV 2000", "Tesla Model S Sedan 2012"], dtype=object)})
    annotations = np.array([("00002.jpg", 2), ("00001.jpg", 1)], dtype=[("fname", object), ("class", object)])
    savemat(cars / "cars_test_annos_withlabels.mat", {"annotations": annotations})
    for i in (1, 2):
        write_image(str(cars / "cars_test" / f"{i:05d}.jpg"), 30 + i)
    os.makedirs(root / "pcam")
    with h5py.File(root / "pcam" / "camelyonpatch_level_2_split_test_x.h5", "w") as f:
        f["x"] = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    with h5py.File(root / "pcam" / "camelyonpatch_level_2_split_test_y.h5", "w") as f:
        f["y"] = np.array([1, 0, 1], dtype=np.uint8).reshape(3, 1, 1, 1)


def test_registry_reads_the_mat_and_h5_formats(tmp_path, monkeypatch):
    fake_mat_and_h5(tmp_path, monkeypatch)
    flowers = common.read_data_list("flowers102.txt")
    assert len(flowers) == len(set(flowers)) == 102 and flowers[0] == "pink primrose" and flowers[76] == \
        "passion flower"
    # name: (refined class names (Flowers102: the first and last only), labels in dataset order, image side)
    expected = {"Flowers102": (["pink primrose", "blackberry lily"], [101, 76], 32),
                "StanfordCars": (["am general hummer suv", "tesla model s sedan"], [1, 0], 32),
                "PCAM": (["healthy lymph node tissue", "lymph node tumor tissue"], [1, 0, 1], 32)}
    for name, (names, labels, side) in expected.items():
        got_name, ds, got_names, template = eval_datasets.eval_dataset(name, str(tmp_path), side)
        assert got_name == name and template == SPEC_TEMPLATES[name]
        assert [got_names[0], got_names[-1]] == names, name
        assert [ds[i][1] for i in range(len(ds))] == labels, name
        assert all(ds[i][0].shape == (3, side, side) and 0 <= ds[i][0].min() and ds[i][0].max() <= 1
                   for i in range(len(ds)))
    assert len(eval_datasets.eval_dataset("Flowers102", str(tmp_path), 32)[2]) == 102


def fake_devkit(base, monkeypatch):
    """ImageNet's ILSVRC2012_devkit_t12.tar.gz as torchvision parses it (data/meta.mat with the synsets, of which
    only the leaves (num_children 0) are classes, and the validation ground truth), plus val/<wnid>/ folders."""
    import tarfile
    from scipy.io import savemat
    import torchvision.datasets.imagenet as tv_imagenet
    monkeypatch.setattr(tv_imagenet, "check_integrity", lambda path, md5=None: os.path.isfile(path))  # md5 unchecked
    fields = [("ILSVRC2012_ID", object), ("WNID", object), ("words", object), ("gloss", object),
              ("num_children", object), ("children", object), ("wordnet_height", object), ("num_train_images", object)]
    synsets = np.array([(1, "n01440764", "tench, Tinca tinca", "a fish", 0, np.zeros(0), 0, 1300),
                        (2, "n01443537", "gold-fish, Carassius auratus", "a fish", 0, np.zeros(0), 0, 1300),
                        (3, "n00000001", "fish", "a parent synset", 2, np.array([1, 2]), 1, 0)], dtype=fields)
    staging = base / "staging" / "ILSVRC2012_devkit_t12" / "data"
    os.makedirs(staging)
    savemat(staging / "meta.mat", {"synsets": synsets})
    (staging / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n")
    with tarfile.open(base / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(base / "staging" / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    for split in ("val", "train"):
        for k, wnid in enumerate(("n01440764", "n01443537")):
            write_image(str(base / split / wnid / f"ILSVRC2012_{split}_{k}.JPEG"), 40 + k)


def test_imagenet_class_names_from_the_devkit_archive(tmp_path, monkeypatch):
    """Evaluation and training read ImageNet's class names (first synonym) out of the devkit archive itself, refine
    them the same way (so training prompts are evaluation's), and write nothing into the dataset folder: it may be
    read-only, and every rank reads it at once (torchvision's ImageNet writes meta.bin there, non-atomically)."""
    fake_devkit(tmp_path / "imagenet", monkeypatch)
    files = lambda: sorted(str(p) for p in tmp_path.rglob("*"))  # noqa: E731
    before = files()
    name, ds, names, _ = eval_datasets.eval_dataset("ImageNet", str(tmp_path), 32)
    assert (name, names, len(ds)) == ("ImageNet", ["tench", "gold fish"], 2)
    ds, names = common.training_dataset(str(tmp_path / "imagenet"), 32)
    assert names == ["tench", "gold fish"] and sorted(ds[i][1] for i in range(len(ds))) == [0, 1]
    assert files() == before, "reading the devkit wrote into the dataset folder"
    for w in ("n01440764", "n01443537"):  # the WordNet-id datasets name their folders through the same devkit
        write_image(str(tmp_path / "imagenet-r" / w / "a.jpg"), 1)
    assert eval_datasets.eval_dataset("ImageNet-R", str(tmp_path), 32)[2] == ["tench", "gold fish"]


def test_download_fetches_then_reads(tmp_path, monkeypatch):
    """--download goes through torchvision's download code (here a stand-in that writes the fake archives'
    contents instead of fetching them) and then reads what it left; without it, the same root is 'not found'."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.utils as tv_utils
    fetched = []

    def fake_download(url, download_root, *a, **k):  # torchvision.datasets.utils.download_and_extract_archive
        fetched.append(url)
        if "cifar-10" in url:
            fake_cifar(tmp_path, monkeypatch)
        else:
            fake_files(tmp_path)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    with pytest.raises(common.UsageError, match="CIFAR10: not found.*pass --download"):
        eval_datasets.eval_dataset("CIFAR10", str(tmp_path), 32)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: bool(fetched))  # absent until fetched
    name, ds, names, _ = eval_datasets.eval_dataset("CIFAR10", str(tmp_path), 32, download=True)
    assert (name, names, len(ds)) == ("CIFAR10", ["airplane", "automobile", "bird"], 3)
    assert len(fetched) == 1 and fetched[0].startswith("https://")
    # TinyImageNet is fetched by the registry itself (torchvision has no class for it)
    name, ds, names, _ = eval_datasets.eval_dataset("TinyImageNet", str(tmp_path), 32, download=True)
    assert (names, len(ds)) == (["tench", "goldfish"], 2) and fetched[1] == common.TINY_IMAGENET_URL
    # a download that fails is one line naming the dataset
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", lambda *a, **k: (_ for _ in ()).throw(
        OSError("network is unreachable\nsecond line")))
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: False)
    with pytest.raises(common.UsageError) as e:
        eval_datasets.eval_dataset("CIFAR100", str(tmp_path / "empty"), 32, download=True)
    assert "\n" not in str(e.value) and str(e.value).startswith("CIFAR100: could not download or read")
    assert str(e.value).endswith("check the network, or put the files there yourself")  # not "pass --download" again
    assert "network is unreachable" in str(e.value)


@pytest.mark.parametrize("name,folder", [("Flowers102", "flowers-102"), ("StanfordCars", "stanford_cars"),
                                         ("PCAM", "pcam")])
def test_incomplete_mat_or_h5_copies_fail_in_one_line(name, folder, tmp_path):
    """A broken or incomplete copy of a .mat / .h5 dataset gives a one-line error naming the dataset."""
    os.makedirs(tmp_path / folder)
    with pytest.raises(common.UsageError) as e:
        eval_datasets.eval_dataset(name, str(tmp_path), 32)
    assert "\n" not in str(e.value) and str(e.value).startswith(name)


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv,message", [
    (["--datasets", "CIFAR10", "--data-root", "{tmp}"], "CIFAR10: not found"),
    (["--datasets", "CIFAR11"], "unknown dataset"),
    (["--datasets", "folder:{tmp}/nowhere"], "no such directory"),
    (["--attacks", "pgd,fgsm", "--datasets", "demo"], "unknown attack"),
    (["--eps", "-1", "--datasets", "demo"], "--eps -1.0: must be >= 0"),
    (["--steps", "0", "--datasets", "demo"], "--steps 0"),
    (["--model", "{tmp}/garbage.pt", "--datasets", "demo"], "unreadable checkpoint"),
    (["--model", "{tmp}/missing.pt", "--datasets", "demo"], "no such file"),
])
def test_bad_input_is_one_line_error(argv, message, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--model" not in argv:
        argv += ["--model", "random:tiny"]
    code, _, err = run_in_process(argv + ["--workers", "0", "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "r.json").exists()


def test_out_with_the_tables_extension_is_refused(tmp_path, capsys):
    """The Markdown table goes beside --out with .md for its extension: --out res.md would be written over by it."""
    code, _, err = run_in_process(["--model", "random:tiny", "--datasets", "demo", "--out", str(tmp_path / "res.md")],
                                  capsys)
    assert code == 2 and err.count("\n") == 1 and f"--out {tmp_path / 'res.json'}" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage")
    p = run_script(["evaluate.py", "--model", str(tmp_path / "garbage.pt"), "--datasets", "demo"])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: --model") and p.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------- protocols
CPU = torch.device("cpu")


def parse(*argv):
    return evaluate.parse_args(["--model", "demo", "--datasets", "demo", *argv])


@pytest.mark.parametrize("protocol,attacks,steps,samples", [
    ("agft", ["pgd", "cw", "aa"], {"pgd": 20, "cw": 20, "aa": 10}, None),  # AGFT code: torchattacks AA, 10 iterations
    ("advflyp", ["pgd", "cw", "aa"], {"pgd": 10, "cw": 10, "aa": 100}, None),
    ("robustvlm", ["aa-ce-t"], {"aa-ce-t": 100}, 1000),
])
def test_protocol_sets_attacks_iterations_and_images(protocol, attacks, steps, samples):
    args = parse("--protocol", protocol)
    assert (args.attacks, args.steps, args.alpha, args.samples) == (attacks, steps, 1.0, samples)


def test_without_a_protocol_the_defaults_are_unchanged():
    args = parse()
    assert (args.protocol, args.attacks, args.steps, args.alpha, args.samples) == (None, ["pgd"], {"pgd": 20}, 1.0,
                                                                                    None)
    assert parse("--attacks", "pgd,apgd-ce,square").steps == {"pgd": 20, "apgd-ce": 100, "square": 5000}


def test_explicit_flags_override_the_protocol():
    args = parse("--protocol", "robustvlm", "--attacks", "apgd-ce,apgd-t", "--samples", "all", "--alpha", "0.5")
    assert (args.attacks, args.steps, args.samples, args.alpha) == (["apgd-ce", "apgd-t"],
                                                                    {"apgd-ce": 100, "apgd-t": 100}, None, 0.5)
    assert parse("--protocol", "agft", "--steps", "5").steps == {"pgd": 5, "cw": 5, "aa": 5}
    assert parse("--protocol", "agft", "--steps", "aa=3,cw=7").steps == {"pgd": 20, "cw": 7, "aa": 3}
    assert parse("--protocol", "advflyp", "--samples", "64").samples == 64


def test_table6_group_is_the_papers_column_order_with_10_iteration_aa():
    args = parse("--protocol", "agft", "--attacks", "table6")
    # AGFT paper, Table 6: PGD MI DI2 TI NI PI PI++ C&W AA PGDT PGDTL MIT DI2T TIT NIT
    assert args.attacks == ["pgd", "mi", "di", "ti", "ni", "pi", "pi++", "cw", "aa", "pgd-t-rand", "pgd-t-least",
                            "mi-t", "di-t", "ti-t", "ni-t"]
    assert args.steps == {**dict.fromkeys(args.attacks, 20), "aa": 10}
    assert parse("--attacks", "table6").steps["aa"] == 100  # without the protocol: this project's default


@pytest.mark.parametrize("argv,message", [
    (["--protocol", "nope"], "invalid choice"),
    (["--steps", "x=3"], "--steps x=3: x is not among the attacks"),
    (["--steps", "pgd=0"], "--steps pgd=0: must be >= 1"),
    (["--steps", "many"], "--steps many: expected N or NAME=N"),
    (["--samples", "some"], "--samples some: expected a number of images or 'all'"),
    (["--attacks", "table7"], "--attacks table7: unknown attack"),
])
def test_bad_protocol_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises((common.UsageError, SystemExit)) as e:
        parse(*argv)
    assert message in (str(e.value) if isinstance(e.value, common.UsageError) else capsys.readouterr().err)


def test_help_lists_datasets_attacks_groups_and_protocols(capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in [*eval_datasets.EVAL_DATASETS, *attacks.ATTACKS, *evaluate.ATTACK_GROUPS, *evaluate.PROTOCOLS,
                 *evaluate.DATASET_GROUPS]:
        assert name in text, name


def test_protocol_is_in_the_results_and_the_title(tmp_path, capsys):
    out = tmp_path / "r.json"
    evaluate.main(["--model", "demo", "--datasets", "demo", "--samples", "16", "--protocol", "agft",
                   "--steps", "pgd=2,cw=2,aa=2", "--eps", "4", "--workers", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["settings"]["protocol"] == "agft" and report["settings"]["steps"] == {"pgd": 2, "cw": 2, "aa": 2}
    assert report["notes"][0].startswith("protocol agft: the AGFT code")
    table = (tmp_path / "r.md").read_text()
    assert "protocol agft" in table.splitlines()[0] and "AA (APGD-CE + APGD-DLR, 2 it.)" in table


def test_advflyps_validation_set_is_tinyimagenet_or_a_folder(tmp_path):
    """advflyp.py --val-data (common.validation_dataset): TinyImageNet under --val-root, the same images, classes and
    prompt as evaluate.py's TinyImageNet, or an ImageFolder directory; anything else is one line (the other benchmark
    datasets live in eval_datasets.py, which training does not import)."""
    fake_files(tmp_path)
    name, ds, names, template = common.validation_dataset("TinyImageNet", str(tmp_path), 32)
    same = eval_datasets.eval_dataset("TinyImageNet", str(tmp_path), 32)
    assert (name, names, template) == same[:1] + same[2:] and [ds[i][1] for i in range(len(ds))] == \
        [same[1][i][1] for i in range(len(same[1]))]
    name, ds, names, _ = common.validation_dataset(str(tmp_path / "country211" / "test"), str(tmp_path), 32)
    assert (name, names) == ("test", ["ad", "us"])  # folder names as they are (no ISO table: not evaluate's Country211)
    with pytest.raises(common.UsageError, match="--val-data CIFAR10: neither TinyImageNet nor a directory"):
        common.validation_dataset("CIFAR10", str(tmp_path), 32)
    with pytest.raises(common.UsageError, match="--val-data TinyImageNet: not found, expected"):
        common.validation_dataset("TinyImageNet", str(tmp_path / "empty"), 32)


def test_the_advflyp_protocol_prompts_imagenet_r_and_sketch_as_its_paper(tiny_ckpt, tmp_path, capsys):
    """--protocol advflyp: ImageNet-R with 'This is an artistic rendering of {}.' and ImageNet-Sketch with 'This is a
    sketch of a {}.' (the AdvFLYP paper's appendix); other datasets and other protocols keep data_lists/templates.tsv,
    and --template still overrides every dataset."""
    fake_files(tmp_path)
    argv = ["--model", tiny_ckpt, "--datasets", "ImageNet-R,ImageNet-Sketch,ImageNet-A", "--data-root", str(tmp_path),
            "--attacks", "none", "--workers", "0"]
    templates = {}
    for protocol in ("advflyp", "agft"):
        out = tmp_path / f"{protocol}.json"
        assert run_in_process([*argv, "--protocol", protocol, "--out", str(out)], capsys)[0] == 0
        templates[protocol] = json.loads(out.read_text())["settings"]["templates"]
    assert templates["advflyp"] == {"ImageNet-R": "This is an artistic rendering of {}.",
                                    "ImageNet-Sketch": "This is a sketch of a {}.",
                                    "ImageNet-A": "This is a photo of a {}."}
    assert set(templates["agft"].values()) == {"This is a photo of a {}."}
    out = tmp_path / "mine.json"
    assert run_in_process([*argv, "--protocol", "advflyp", "--template", "a {}.", "--out", str(out)], capsys)[0] == 0
    assert set(json.loads(out.read_text())["settings"]["templates"].values()) == {"a {}."}


@pytest.fixture(scope="module")
def demo64():
    """The demo CLIP and 64 held-out images (4 per class) as zero_shot_samples sees them."""
    return demo_zero_shot(4)


@pytest.mark.slow
def test_shared_parts_run_once_and_give_the_same_accuracies(demo64, monkeypatch):
    """apgd-ce, apgd-ce-x5, apgd-dlr, apgd-t, aa and aa-ce-t together: APGD runs for apgd-ce once, for apgd-ce-x5 once
    per restart, for apgd-dlr once and for apgd-t once per target on each batch (aa and aa-ce-t find their parts'
    results), and every accuracy equals the one of the attack evaluated alone."""
    encoder, text, ds, _ = demo64
    calls = []
    apgd = attacks.apgd
    monkeypatch.setattr(attacks, "apgd", lambda *a, **k: calls.append(len(a[2])) or apgd(*a, **k))
    dist = common.Dist(0, 1, 0, CPU)
    names = ("aa", "apgd-ce", "apgd-ce-x5", "apgd-dlr", "aa-ce-t", "apgd-t")
    together = zero_shot_eval(encoder, text, ds, dist, names, 4 / 255, 1 / 255, 3, batch_size=32)
    n_together = len(calls)
    alone = {}
    for name in names:
        alone.update(zero_shot_eval(encoder, text, ds, dist, (name,), 4 / 255, 1 / 255, 3, batch_size=32))
    assert together == alone
    n_alone = len(calls) - n_together
    # together: per batch 1 (CE) + 1 (DLR) + up to 9 (APGD-T targets); alone, aa and aa-ce-t repeat CE, DLR and T
    assert n_together < n_alone
    calls.clear()
    zero_shot_eval(encoder, text, ds, dist, ("apgd-ce", "apgd-ce-x5", "apgd-dlr", "apgd-t"), 4 / 255,
                            1 / 255, 3, batch_size=32)
    assert n_together == len(calls)  # aa and aa-ce-t added no APGD run


class PerImageEncoder(torch.nn.Module):
    """An image encoder run one image at a time: each image rounds the same whatever batch it is in (see
    tests/test_attacks.py, PerImage)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return torch.cat([self.encoder(x[i:i + 1]) for i in range(len(x))])


def test_early_exit_changes_no_result_and_no_metric(demo64):
    """zero_shot_samples with APGD's early exit (the default) and without (--no-early-exit): every per-image field the
    same bit for bit, the accuracies of apgd-ce and aa and the structure metrics, which are computed at the first
    attack's x_adv, run without early exit (its highest-loss fooling iterate, as before early exit)."""
    encoder, text, ds, _ = demo64
    encoder, dist = PerImageEncoder(encoder), common.Dist(0, 1, 0, CPU)
    indices = range(24)
    runs = []
    for early in (True, False):
        with attacks.early_exit(early):
            runs.append([out for _, out in evaluate.zero_shot_samples(
                encoder, text, ds, dist, ("apgd-ce", "aa"), 2 / 255, 1 / 255, 6, batch_size=12,
                metrics=("conf", "phi"), indices=indices)])
    assert len(runs[0]) == len(runs[1]) == 2
    for a, b in zip(*runs):
        assert set(a) == set(b) and {"apgd-ce", "aa", "conf.adv", "phi.adv"} <= set(a)
        for field in a:
            assert torch.equal(a[field], b[field]), field
    robust = torch.cat([out["aa"] for out in runs[0]])
    assert 0 < int(robust.sum()) < 24  # some images fooled, some not


def test_no_early_exit_is_recorded_and_may_differ_on_a_rerun(tiny_ckpt, tmp_path, capsys):
    """--no-early-exit is in the settings (early_exit: false) but not in an evaluation's identity: the per-image results
    are the same, so a rerun with the default continues it."""
    folder = make_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    out = tmp_path / "r.json"
    argv = ["--model", tiny_ckpt, "--datasets", f"folder:{folder}", "--attacks", "apgd-ce", "--steps", "2",
            "--workers", "0", "--out", str(out)]
    assert run_in_process([*argv, "--no-early-exit"], capsys)[0] == 0
    first = json.loads(out.read_text())
    assert first["settings"]["early_exit"] is False
    code, stdout, err = run_in_process(argv, capsys)
    assert code == 0 and "already evaluated" in stdout, (stdout, err)  # not refused: nothing to redo
    assert json.loads(out.read_text())["datasets"] == first["datasets"]


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_an_unreadable_image_stops_with_its_name_and_the_rerun_continues(nproc, tiny_ckpt, tmp_path, capsys):
    """A benchmark missing an image is not the benchmark: evaluation stops with one line naming the file (every rank,
    whichever one met it), keeps what it evaluated, and once the file is readable again the same command continues."""
    folder = tmp_path / "data"
    make_folder(folder, {"cat": 3, "dog": 3})
    broken = sorted((folder / "dog").iterdir())[1]
    good = broken.read_bytes()
    broken.write_bytes(b"not an image")
    out = tmp_path / "r.json"
    argv = ["--model", tiny_ckpt, "--datasets", f"folder:{folder}", "--attacks", "pgd", "--steps", "2",
            "--batch-size", "1", "--workers", "0", "--save-every", "0", "--out", str(out)]
    if nproc == 1:
        code, _, err = run_in_process(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    else:  # image 4 is rank 0's; rank 1 stops with it instead of waiting (torchrun then adds its own report)
        r = run_script(["evaluate.py", *argv], nproc=2, timeout=300)
        code, err = r.returncode, r.stderr
        assert code != 0 and err.splitlines()[0].startswith("error: "), err
    assert err.startswith("error: data: image 4 cannot be read") and str(broken) in err.splitlines()[0], err
    broken.write_bytes(good)
    code, stdout, err = run_in_process(argv, capsys)
    done = 4 if nproc == 1 else 5  # 2 processes: rank 1 had evaluated image 5 in the same step
    assert code == 0 and f"continuing, {done} of 6 images already evaluated" in stdout, err


def test_stable_ce_is_recorded_and_compared(tiny_ckpt, tmp_path, capsys):
    """--stable-ce is part of the evaluation's identity (a rerun without it is refused), said in the table's title,
    and --compare pairs it with the reference loss's evaluation of the same images, saying the difference."""
    folder = make_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    argv = ["--model", tiny_ckpt, "--datasets", f"folder:{folder}", "--attacks", "pgd", "--steps", "2",
            "--workers", "0", "--attack-all"]
    stable, plain = tmp_path / "stable.json", tmp_path / "plain.json"
    assert run_in_process([*argv, "--stable-ce", "--out", str(stable)], capsys)[0] == 0
    assert run_in_process([*argv, "--out", str(plain)], capsys)[0] == 0
    assert json.loads(stable.read_text())["settings"]["stable_ce"] is True
    assert "stable_ce" not in json.loads(plain.read_text())["settings"]  # as in results written before the flag
    assert "(--stable-ce)" in stable.with_suffix(".md").read_text().splitlines()[0]
    code, _, err = run_in_process([*argv, "--out", str(stable)], capsys)
    assert code == 2 and "--stable-ce: null here, true there" in err, err
    code, out, _ = run_in_process(["--compare", str(stable), str(plain)], capsys)
    assert code == 0 and "note: --stable-ce: true in A" in out, out
