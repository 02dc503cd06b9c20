"""Hand-written query sets with label rules, and the metrics that grade rankings against them.

A query file (`retrieval/queries/eval.yaml`, `dev.yaml`) lists `{id, text, relevant}`; `relevant`
is a rule over a tile's label facts (`rule_facts`), e.g. `tree >= 0.5 and tree_height >= 20`.
Rules are parsed into a small expression tree (comparisons, `and`/`or`/`not`, + - * /,
numbers, the fact names below): nothing is `eval`-ed. A fact that is unknown for a tile (NDVI of
an RGB-only scene, heights without ground points) makes every comparison it takes part in false,
so a tile is never called relevant on facts it does not have.

Metrics per query over a ranked pool: precision@10, hit@k (a relevant tile in the top k, the
"R@k" of a query set with many relevant tiles per query) and binary nDCG@10, each beside its
chance level (a uniformly random ranking: r/n for precision, 1 - C(n-r, k)/C(n, k) for hit@k,
E[DCG]/IDCG for nDCG), and means over queries with percentile bootstrap intervals.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from retrieval.captions import kind_shares
from retrieval.data import TileInfo

QUERY_DIR = Path(__file__).parent / "queries"
EVAL_QUERIES = QUERY_DIR / "eval.yaml"
DEV_QUERIES = QUERY_DIR / "dev.yaml"
HIT_KS = (1, 5, 10)
PRECISION_K = 10
BOOTSTRAP = 10_000

FACTS_HELP = {
    "others, ground, tree, building": "labelled-pixel shares of the N3C classes (0-1)",
    "low_vegetation, water, bridge, road": "ASPRS-refined shares (captions.kind_shares)",
    "tree_height, building_height": "95th percentile height above ground (m); 0 without the class",
    "ndvi": "mean NDVI (None without NIR)",
    "slope, relief": "mean ground slope (deg), 2-98 % ground elevation range (m)",
    "brightness, red_share, green_share, blue_share, texture": "colour facts (data._colour)",
    "tree_patches, tree_elongation, building_tree_contact": "mask shape facts (data._layout)",
}


def rule_facts(tile: TileInfo) -> dict[str, float | None]:
    """The variables a relevance rule may use (see FACTS_HELP)."""
    s = tile.stats
    facts: dict[str, float | None] = {
        c: tile.class_fractions.get(c, 0.0) for c in tile.class_fractions
    }
    facts |= {k: v for k, v in kind_shares(tile).items() if k != "ground"}
    for c in ("tree", "building"):
        present = tile.class_fractions.get(c, 0.0) > 0
        facts[f"{c}_height"] = s.get(f"{c}_height_p95") if present else 0.0
    facts["ndvi"], facts["slope"], facts["relief"] = (
        s.get("ndvi_mean"),
        s.get("slope_deg"),
        s.get("relief_m"),
    )
    for k in ("brightness", "red_share", "green_share", "blue_share", "texture"):
        facts[k] = s.get(k)
    facts["tree_patches"] = s.get("tree_patches") or 0.0
    facts["tree_elongation"] = s.get("tree_elongation") or 0.0
    facts["building_tree_contact"] = s.get("building_tree_contact") or 0.0
    return facts


_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
_ARITH: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


@dataclass(frozen=True)
class Rule:
    """A parsed relevance rule; `rule(facts)` -> bool."""

    source: str
    tree: ast.Expression

    @classmethod
    def parse(cls, source: str) -> Rule:
        try:
            tree = ast.parse(source, mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"bad relevance rule {source!r}: {exc.msg}") from exc
        for node in ast.walk(tree):
            allowed = (
                ast.Expression,
                ast.BoolOp,
                ast.And,
                ast.Or,
                ast.UnaryOp,
                ast.Not,
                ast.USub,
                ast.Compare,
                ast.BinOp,
                ast.Name,
                ast.Load,
                ast.Constant,
                *_COMPARE,
                *_ARITH,
            )
            if not isinstance(node, allowed):
                raise ValueError(f"relevance rule {source!r} uses {type(node).__name__}")
            if isinstance(node, ast.Constant) and not isinstance(node.value, int | float):
                raise ValueError(f"relevance rule {source!r}: only numbers are allowed")
        return cls(source, tree)

    def names(self) -> set[str]:
        return {n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name)}

    def __call__(self, facts: Mapping[str, float | None]) -> bool:
        unknown = self.names() - set(facts)
        if unknown:
            raise ValueError(f"relevance rule {self.source!r} uses unknown facts {sorted(unknown)}")
        return bool(_evaluate(self.tree.body, facts))


def _evaluate(node: ast.AST, facts: Mapping[str, float | None]) -> Any:
    if isinstance(node, ast.BoolOp):
        values = [_evaluate(v, facts) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, facts)
        if isinstance(node.op, ast.Not):
            return not value
        return None if value is None else -value
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, facts)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(right_node, facts)
            if left is None or right is None or not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BinOp):
        a, b = _evaluate(node.left, facts), _evaluate(node.right, facts)
        return None if a is None or b is None else _ARITH[type(node.op)](a, b)
    if isinstance(node, ast.Name):
        return facts[node.id]
    return node.value  # type: ignore[attr-defined]


@dataclass(frozen=True)
class QuerySpec:
    id: str
    text: str
    rule: Rule


def load_queries(path: Path = EVAL_QUERIES) -> list[QuerySpec]:
    """A query file; ids must be unique, every rule must parse."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    specs = [
        QuerySpec(q["id"], q["text"], Rule.parse(q["relevant"])) for q in raw.get("queries", [])
    ]
    ids = [q.id for q in specs]
    if not specs or len(set(ids)) != len(ids):
        raise ValueError(f"{path}: needs queries with unique ids")
    return specs


def relevance_matrix(queries: Sequence[QuerySpec], tiles: Sequence[TileInfo]) -> np.ndarray:
    """(Q, N) bool: tile j is relevant to query i by the query's rule."""
    facts = [rule_facts(t) for t in tiles]
    return np.array([[q.rule(f) for f in facts] for q in queries], dtype=bool)


def query_metrics(ranked: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """Metrics of one query: `ranked` = pool indices best first (at least the top 10),
    `relevant` = (N,) bool over the pool."""
    n, r = len(relevant), int(relevant.sum())
    hits = relevant[ranked[: max(PRECISION_K, *HIT_KS)]]
    out = {f"p@{PRECISION_K}": float(hits[:PRECISION_K].mean())}
    out[f"chance_p@{PRECISION_K}"] = r / n
    out[f"ceiling_p@{PRECISION_K}"] = min(r, PRECISION_K) / PRECISION_K
    for k in HIT_KS:
        out[f"hit@{k}"] = float(hits[:k].any())
        out[f"chance_hit@{k}"] = 1.0 - _comb_ratio(n, r, k)
    k = PRECISION_K
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = discount[: min(r, k)].sum()
    out[f"ndcg@{k}"] = float((hits[:k] * discount[: len(hits[:k])]).sum() / ideal)
    out[f"chance_ndcg@{k}"] = float(r / n * discount[: min(k, n)].sum() / ideal)
    return out


def _comb_ratio(n: int, r: int, k: int) -> float:
    """C(n-r, k) / C(n, k): probability that k random picks miss all r relevant items."""
    k = min(k, n)
    if n - r < k:
        return 0.0
    return math.comb(n - r, k) / math.comb(n, k)


def bootstrap_ci(
    values: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean over `values` (queries resampled with replacement)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return (math.nan, math.nan)
    means = v[np.random.default_rng(seed).integers(0, v.size, (resamples, v.size))].mean(1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def summarise(per_query: Sequence[Mapping[str, float]], seed: int = 0) -> dict[str, Any]:
    """Mean, 95 % bootstrap interval and mean chance level of every metric."""
    out: dict[str, Any] = {}
    for key in per_query[0] if per_query else ():
        if f"chance_{key}" not in per_query[0]:  # ids, counts, the levels themselves
            continue
        values = [q[key] for q in per_query]
        out[key] = {
            "mean": float(np.mean(values)),
            "ci95": bootstrap_ci(values, seed),
            "chance": float(np.mean([q[f"chance_{key}"] for q in per_query])),
        }
        if f"ceiling_{key}" in per_query[0]:
            out[key]["ceiling"] = float(np.mean([q[f"ceiling_{key}"] for q in per_query]))
    return out
