"""benchmarks/attack_speed.py, our attacks against torchattacks' side by side: it runs, and both sides agree on the
robust accuracy (slow tier; nothing here times anything or asserts a speed)."""
import json

import pytest

import attack_speed  # benchmarks/ is on pytest's path (pytest.ini)


@pytest.mark.slow
def test_attack_speed_runs_and_both_sides_agree(tmp_path, one_thread):
    """The demo CLIP, 32 images, 6 iterations, every attack, one seed per side, with the no-early-exit run too.
    Our draws are not torchattacks' (random starts, targets), so an image near its decision boundary can go either way:
    the two robust accuracies may differ by a few images (measured: 0 or 1 of 32 for each attack; 4 allowed, 12.5
    points). Early exit on and off: the same per-image results up to the float rounding of batches of other sizes
    (measured: 0 images; 1 allowed). The pass counts, exactly: PGD takes S forwards and S input gradients per image;
    APGD without early exit S + 1 forwards and S gradients (its last iterate's would go unused); early exit leaves
    PGD's alone and takes fewer in the APGD family, which fools images before their last iterate here (measured: 4.4
    against 6 gradients per image for APGD-CE)."""
    out = tmp_path / "bench.json"
    rows = attack_speed.main(["--images", "32", "--batch-size", "16", "--steps", "6", "--seeds", "1",
                              "--no-early-exit-too", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    for name in attack_speed.ATTACKS:
        mine = {r["side"]: r for r in rows if r["attack"] == name}
        assert set(mine) == {"ours", "ours, no early exit", "torchattacks"}
        assert all(r["img_per_s"] > 0 for r in mine.values())
        assert abs(mine["ours"]["robust"] - mine["torchattacks"]["robust"]) <= 12.5, (name, mine)
        assert mine["ours, no early exit"]["images_differing_from_early_exit"] <= 1, (name, mine)
        fewer = mine["ours"]["backward_passes_per_image"] < mine["ours, no early exit"]["backward_passes_per_image"]
        assert fewer == (name != "pgd"), (name, mine)
    passes = {(r["attack"], r["side"]): (r["forward_passes_per_image"], r["backward_passes_per_image"]) for r in rows}
    assert passes["pgd", "ours"] == passes["pgd", "torchattacks"] == (6, 6)
    assert passes["apgd-ce", "ours, no early exit"] == (7, 6)


def test_attack_speed_batches_as_evaluate_does():
    """The benchmark's default batch is evaluate.py's (the speed it reports is evaluate.py's: early exit shrinks a
    batch, and how much that costs depends on the batch; docs/performance.md)."""
    import evaluate
    assert attack_speed.parse_args([]).batch_size == evaluate.parse_args(["--datasets", "synthetic"]).batch_size == 256
