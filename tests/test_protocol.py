"""evaluate.py's protocols and attack groups (docs/evaluation.md): what --protocol agft|advflyp|robustvlm sets and
what explicit flags override, --attacks table6 in the paper's column order, per-attack --steps, --help's lists, the
protocol in the results, and the attacks that others are made of run once per image when several are asked for."""
import json

import pytest
import torch

import attacks
import common
import evaluate
from conftest import demo_zero_shot

pytestmark = pytest.mark.usefixtures("one_thread")
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
    for name in [*common.EVAL_DATASETS, *attacks.ATTACKS, *evaluate.ATTACK_GROUPS, *evaluate.PROTOCOLS,
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


@pytest.fixture(scope="module")
def demo():
    """The demo CLIP and 64 held-out images (4 per class) as zero_shot_samples sees them."""
    return demo_zero_shot(4)


def test_shared_parts_run_once_and_give_the_same_accuracies(demo, monkeypatch):
    """apgd-ce, apgd-dlr, apgd-t, aa and aa-ce-t together: APGD runs for apgd-ce once, for apgd-dlr once and for
    apgd-t once per target on each batch (aa and aa-ce-t find their parts' results), and every accuracy equals the
    one of the attack evaluated alone."""
    encoder, text, ds, _ = demo
    calls = []
    apgd = attacks.apgd
    monkeypatch.setattr(attacks, "apgd", lambda *a, **k: calls.append(len(a[2])) or apgd(*a, **k))
    dist = common.Dist(0, 1, 0, CPU)
    names = ("aa", "apgd-ce", "apgd-dlr", "aa-ce-t", "apgd-t")
    together = evaluate.zero_shot_eval(encoder, text, ds, dist, names, 4 / 255, 1 / 255, 3, batch_size=32)
    n_together = len(calls)
    alone = {}
    for name in names:
        alone.update(evaluate.zero_shot_eval(encoder, text, ds, dist, (name,), 4 / 255, 1 / 255, 3, batch_size=32))
    assert together == alone
    n_alone = len(calls) - n_together
    # together: per batch 1 (CE) + 1 (DLR) + up to 9 (APGD-T targets); alone, aa and aa-ce-t repeat CE, DLR and T
    assert n_together < n_alone
    calls.clear()
    evaluate.zero_shot_eval(encoder, text, ds, dist, ("apgd-ce", "apgd-dlr", "apgd-t"), 4 / 255, 1 / 255, 3,
                          batch_size=32)
    assert n_together == len(calls)  # aa and aa-ce-t added no APGD run
