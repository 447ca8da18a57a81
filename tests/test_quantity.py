"""modelfit.nodes.parse_quantity agrees with the kubernetes package's parser.

The pure core keeps its own twelve-line parser: importing ``kubernetes.utils`` loads the whole client
package (measured: +0.5 s and +11 MiB on ``modelfit plan``), and the layer contract keeps the cluster
clients out of the pure modules. This test pins the two to the same answers.
"""

from decimal import Decimal

import pytest
from kubernetes.utils import parse_quantity as k8s_parse_quantity

from modelfit.nodes import parse_quantity

CASES = [
    "0", "1", "2", "16", "1500m", "250m", "100m", "0.5", "1.5", "1e3", "2E6",
    "1Ki", "4Mi", "512Mi", "4Gi", "64Gi", "1.5Gi", "1Ti", "2Pi", "1Ei",
    "1k", "5M", "3G", "1T", "1P", "1E", "128974848", "129e6", "123Mi", "1.25", "3500m",
]  # fmt: skip


@pytest.mark.parametrize("q", CASES)
def test_agrees_with_kubernetes(q: str) -> None:
    ours, theirs = parse_quantity(q), k8s_parse_quantity(q)
    assert Decimal(repr(ours)) == pytest.approx(theirs, rel=Decimal("1e-12")), q


@pytest.mark.parametrize("q", ["", "Gi", "abc", "1Xi", "--1"])
def test_rejects_what_kubernetes_rejects(q: str) -> None:
    with pytest.raises(ValueError):
        k8s_parse_quantity(q)
    with pytest.raises(ValueError):
        parse_quantity(q)
