"""Run one of the project's scripts with test patches applied inside the process (torchrun starts one per rank),
for failure paths that need what this machine does not have: a slow download, a long dataset preparation, a short
process-group timeout. Used by tests/test_cluster.py:

    python tests/patched_launch.py SCRIPT.py ARGS...
    torchrun --nproc_per_node=2 tests/patched_launch.py SCRIPT.py ARGS...

Patches, from environment variables:
    TEST_RELEASE_URL=URL      clip's release URL of ViT-B/32 points there (a local server)
    TEST_PG_TIMEOUT_S=N       the default process group's collectives time out after N seconds
    TEST_SLOW_DATASETS_S=N    rank 0 takes N seconds longer to prepare each of evaluate.py's datasets
    TEST_DEMO_STEPS=N         the demo CLIP is pretrained for N steps (a quick stand-in for the 800)
"""
import os
import runpy
import sys
import time
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import clip  # noqa: E402
import torch.distributed  # noqa: E402

import common  # noqa: E402
import eval_datasets  # noqa: E402

if "TEST_RELEASE_URL" in os.environ:
    clip.clip._MODELS["ViT-B/32"] = os.environ["TEST_RELEASE_URL"]
if "TEST_PG_TIMEOUT_S" in os.environ:
    init_process_group = torch.distributed.init_process_group

    def short_timeout(*args, **kwargs):
        return init_process_group(*args, **kwargs, timeout=timedelta(seconds=float(os.environ["TEST_PG_TIMEOUT_S"])))
    torch.distributed.init_process_group = short_timeout
if "TEST_SLOW_DATASETS_S" in os.environ:
    eval_dataset = eval_datasets.eval_dataset

    def slow_eval_dataset(*args, **kwargs):
        if os.environ.get("RANK", "0") == "0":
            time.sleep(float(os.environ["TEST_SLOW_DATASETS_S"]))
        return eval_dataset(*args, **kwargs)
    eval_datasets.eval_dataset = slow_eval_dataset
if "TEST_DEMO_STEPS" in os.environ:
    common.DEMO_PRETRAIN_STEPS = int(os.environ["TEST_DEMO_STEPS"])

sys.argv = sys.argv[1:]
runpy.run_path(os.path.join(ROOT, sys.argv[0]), run_name="__main__")
