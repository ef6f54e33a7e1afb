"""The JobSet CRD the Kubernetes tier serves (spec.nodes > 1 runs an attempt as a JobSet).

JobSet's published CRD when LORA_TEST_JOBSET_CRD names its file (kept out of the repository, e.g.
.cache/third_party/jobset/jobset.x-k8s.io_jobsets.yaml), else the minimal one we author in
tests/fixtures/jobset-crd.yaml (structural, preserving unknown fields), so CI without the file
still runs the feature. `kube_api` registers it at the start of the session: the real garbage
collector watches a new resource only after its next discovery sync (about 30 s), and by the time
tests/integration/test_jobset.py runs it does.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import yaml

CRD_ENV = "LORA_TEST_JOBSET_CRD"
FIXTURE_CRD = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "jobset-crd.yaml"


def jobset_crd() -> dict[str, Any]:
    """JobSet's published CRD from LORA_TEST_JOBSET_CRD, else our minimal one."""
    path = pathlib.Path(os.environ.get(CRD_ENV) or FIXTURE_CRD)
    return next(doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc)
