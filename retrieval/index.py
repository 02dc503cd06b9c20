"""The tile index: faiss vectors + GeoParquet metadata in one folder, built resumably.

Layout of an index folder:

    index.yaml          model reference + fingerprint, dim, data folder, kind, tile count, state
    shards/NNNNN.npz    embedded tiles, one file per `shard_size` tiles (resume unit)
    vectors.npy         all vectors (row i = metadata row i), memory-mapped for --like queries
    vectors.faiss       the search structure over them
    metadata.parquet    GeoParquet: tile id, split, year, CRS, lon/lat bbox, class fractions, stats,
                        class shares predicted from the image (pred_<class>, retrieval.amounts)

Exact inner product (`IndexFlatIP`) up to `FLAT_MAX` tiles; above that an IVF index
(`IndexIVFFlat`, √n lists) whose build time stays in minutes for 10⁶ tiles on a laptop, where
HNSW graph construction takes far longer. Metadata filters are evaluated on the metadata table
first and handed to faiss as an `IDSelectorBitmap`: a selective filter is answered exactly (all
IVF lists probed, only matching tiles scored), a broad one by IVF with more probes, and a query
left with fewer than k hits is redone exactly, so filtered ANN never silently returns fewer
than k hits when k tiles match.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import faiss
import geopandas as gpd
import numpy as np
import pandas as pd
import torch
import yaml
from shapely.geometry import box
from torch import Tensor
from tqdm import tqdm

from geoseg.builder.writers import atomic_path
from geoseg.device import AUTO, resolve_device
from geoseg.errors import first_line
from retrieval.data import TileInfo, load_tiles, tile_rgb

if TYPE_CHECKING:
    from retrieval.embedder import Document

META_FILE = "index.yaml"
FAISS_FILE = "vectors.faiss"
VECTORS_FILE = "vectors.npy"
PREDICTED = "pred_"
"""Metadata column prefix of the class shares predicted from a tile's image (`retrieval.amounts`);
label shares are `frac_<class>`."""
METADATA_FILE = "metadata.parquet"
FLAT_MAX = 50_000
"""Up to this many tiles an exact scan is a few ms per query; above it an IVF index."""
EXACT_SUBSET_MAX = 100_000
"""Filters matching at most this many tiles are answered by an exact scan of those tiles."""
IVF_NPROBE = 32
KINDS = ("auto", "flat", "ivf")


class SearchIndexError(ValueError):
    """Bad index input (missing/incomplete index, unknown tile, another model): exit 2."""


class Embedder(Protocol):
    """What indexing needs from `retrieval.embedder.TileEmbedder` (an OpenCLIP model has no
    `document_weight`: it embeds images only)."""

    dim: int
    fingerprint: str

    def embed_tiles(self, images: Tensor) -> Tensor: ...


def uses_documents(embedder: Any) -> bool:
    """Whether the embedder fuses tile documents into tile vectors (`document_weight` > 0)."""
    return bool(getattr(embedder, "document_weight", 0.0))


def tile_document(tile: TileInfo) -> Document | None:
    """The tile's document (`retrieval.captions.document`), None for a tile without labels."""
    from retrieval.captions import document

    return None if tile.dominant is None else document(tile)


@torch.inference_mode()
def embed_tile_batch(
    embedder: Any, data: Path, batch: Sequence[TileInfo]
) -> tuple[np.ndarray, np.ndarray | None]:
    """(B, dim) float32 vectors of built tiles and (B, C) class shares predicted from the image
    (`retrieval.amounts.CompositionHead`; None when the embedder has no head). A vector is the
    RGB image's, fused with the tile's document (`retrieval.captions.document`: its labels,
    LiDAR heights, NDVI, terrain written out) when the embedder uses documents; a tile without
    labels (imagery the archive has no LiDAR labels for) keeps its image vector. The shares
    come from the image vector alone, never from labels. The one way index and evaluation
    embed a tile."""
    images = torch.stack([tile_rgb(data, t.tile_id) for t in batch])
    vectors = embedder.embed_tiles(images)
    head = getattr(embedder, "composition", None)
    shares = None if head is None else head.predict(vectors.float().cpu().numpy())
    if uses_documents(embedder):
        vectors = embedder.fuse_documents(vectors, [tile_document(t) for t in batch])
    return np.ascontiguousarray(vectors.float().cpu().numpy(), dtype=np.float32), shares


@dataclass(frozen=True)
class Filters:
    """Metadata restrictions of a search; None = no restriction."""

    bbox: tuple[float, float, float, float] | None = None  # lon/lat W S E N, tiles intersecting
    split: str | None = None
    year: int | None = None

    def mask(self, meta: pd.DataFrame) -> np.ndarray | None:
        """Boolean mask of allowed rows, None when nothing is filtered."""
        keep = np.ones(len(meta), bool)
        if self.bbox is not None:
            w, s, e, n = self.bbox
            keep &= (
                (meta["east"].to_numpy() >= w)
                & (meta["west"].to_numpy() <= e)
                & (meta["north"].to_numpy() >= s)
                & (meta["south"].to_numpy() <= n)
            )
        if self.split is not None:
            keep &= (meta["split"] == self.split).to_numpy()  # categorical: compares codes
        if self.year is not None:
            keep &= (meta["year"] == self.year).to_numpy()
        return None if keep.all() else keep


def open_embedder(model: str | Path, device: str | torch.device = AUTO) -> Any:
    """`retrieval.embedder.load_embedder`, with a bad reference (missing folder, unknown HF id,
    not a model) reported as bad input instead of a transformers traceback."""
    from retrieval.embedder import load_embedder

    run_on = resolve_device(device)  # a device error is the device's, not the model's
    try:
        return load_embedder(model, device=run_on)
    except (OSError, ValueError) as exc:
        raise SearchIndexError(f"cannot load embedder {model}: {first_line(exc)}") from exc


def build_index(
    data: Path,
    embedder: Embedder,
    out: Path,
    *,
    model: str,
    batch_size: int = 32,
    shard_size: int = 1024,
    kind: str = "auto",
    progress: bool = True,
    echo: Callable[[str], None] = lambda _: None,
) -> Path:
    """Embed every tile of a build folder into an index at `out`; rerun to resume.

    Shards already on disk (for the same model, data and shard size) are kept, so a killed run
    loses at most one shard. `model` is the reference recorded for searches (path or HF id).
    """
    if kind not in KINDS:
        raise SearchIndexError(f"unknown index kind {kind!r}; choose from {list(KINDS)}")
    data, out = Path(data).resolve(), Path(out)
    tiles = load_tiles(data, progress=progress)
    if not tiles:
        raise SearchIndexError(f"{data} has no tiles")
    meta = {
        "model": model,
        "fingerprint": embedder.fingerprint,
        "dim": int(embedder.dim),
        "data": str(data),
        "shard_size": shard_size,
        "document_version": _document_version(embedder),
        "state": "building",
    }
    _check_resumable(out, meta)
    _write_yaml(out / META_FILE, meta)
    shards = [tiles[i : i + shard_size] for i in range(0, len(tiles), shard_size)]
    todo = [(k, s) for k, s in enumerate(shards) if not _shard_done(out, k, s)]
    if len(todo) < len(shards):
        echo(f"resuming: {len(shards) - len(todo)} of {len(shards)} shards already embedded")
    total = sum(len(s) for _, s in todo)
    bar = tqdm(total=total, desc="embedding", unit="tile", disable=not progress or total == 0)
    for k, shard in todo:
        parts = [
            _embed(embedder, data, shard[i : i + batch_size], bar)
            for i in range(0, len(shard), batch_size)
        ]
        arrays = {"vectors": np.concatenate([v for v, _ in parts])}
        if parts[0][1] is not None:
            arrays["shares"] = np.concatenate([p for _, p in parts])
        with atomic_path(_shard_path(out, k)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays, tile_ids=np.array([t.tile_id for t in shard]))
    bar.close()
    stored = [np.load(_shard_path(out, k)) for k in range(len(shards))]
    vectors = np.concatenate([z["vectors"] for z in stored])
    kind = ("flat" if len(tiles) <= FLAT_MAX else "ivf") if kind == "auto" else kind
    with atomic_path(out / VECTORS_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, vectors)
    _write_faiss(out / FAISS_FILE, make_faiss(vectors, kind))
    frame = metadata_frame(tiles)
    head = getattr(embedder, "composition", None)
    if head is not None and all("shares" in z for z in stored):
        shares = np.concatenate([z["shares"] for z in stored])
        for j, c in enumerate(head.classes):
            frame[f"{PREDICTED}{c}"] = shares[:, j].astype(np.float32)
    with atomic_path(out / METADATA_FILE) as tmp:
        frame.to_parquet(tmp, index=False)
    _write_yaml(out / META_FILE, meta | {"state": "complete", "kind": kind, "count": len(tiles)})
    return out


def _check_resumable(out: Path, meta: dict[str, Any]) -> None:
    path = out / META_FILE
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text()) or {}
    if old.get("fingerprint") != meta["fingerprint"]:
        raise SearchIndexError(
            f"{out} holds an index of another model (fingerprint {old.get('fingerprint')}, "
            f"this model {meta['fingerprint']}); choose a new --out"
        )
    if old.get("data") != meta["data"] or old.get("shard_size") != meta["shard_size"]:
        raise SearchIndexError(f"{out} holds an index of {old.get('data')}; choose a new --out")
    if old.get("document_version") != meta["document_version"]:
        raise SearchIndexError(
            f"{out} holds tile documents of another caption grammar "
            f"(version {old.get('document_version')}); choose a new --out"
        )


def _document_version(embedder: Any) -> int | None:
    """Version of the tile documents in the vectors (None: image-only vectors)."""
    if not uses_documents(embedder):
        return None
    from retrieval.captions import DOCUMENT_VERSION

    return DOCUMENT_VERSION


def _shard_path(out: Path, k: int) -> Path:
    return out / "shards" / f"{k:05d}.npz"


def _shard_done(out: Path, k: int, shard: list[TileInfo]) -> bool:
    path = _shard_path(out, k)
    if not path.is_file():
        return False
    return list(np.load(path)["tile_ids"]) == [t.tile_id for t in shard]


def _embed(
    embedder: Embedder, data: Path, batch: list[TileInfo], bar: tqdm
) -> tuple[np.ndarray, np.ndarray | None]:
    out = embed_tile_batch(embedder, data, batch)
    bar.update(len(batch))
    return out


def make_faiss(vectors: np.ndarray, kind: str) -> faiss.Index:
    """Inner-product index over L2-normalised vectors (= cosine); see the module docstring."""
    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        # ~sqrt(n) lists, but enough training points per list for k-means (faiss wants >= 39).
        nlist = max(1, min(int(math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).permutation(n)[: 64 * nlist]
        index.train(vectors[sample])
        index.nprobe = min(IVF_NPROBE, nlist)
    else:
        raise SearchIndexError(f"unknown index kind {kind!r}; choose flat or ivf")
    index.add(vectors)
    return index


def _write_faiss(path: Path, index: faiss.Index) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def _write_yaml(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False))


def metadata_frame(tiles: Sequence[TileInfo]) -> gpd.GeoDataFrame:
    """GeoParquet-ready rows of the index, in faiss row order."""
    rows = [
        {
            "tile_id": t.tile_id,
            "split": t.split,
            "year": t.year,
            "crs": t.crs,
            "west": t.bbox[0],
            "south": t.bbox[1],
            "east": t.bbox[2],
            "north": t.bbox[3],
            **{f"frac_{c}": t.class_fractions.get(c, 0.0) for c in t.classes},
            **{f"stat_{k}": v for k, v in t.stats.items()},
        }
        for t in tiles
    ]
    frame = gpd.GeoDataFrame(rows, geometry=[box(*t.bbox) for t in tiles], crs="EPSG:4326")
    frame["split"] = frame["split"].astype("category")  # cheap split filters at 10⁶ rows
    return frame


class TileIndex:
    """Vectors + metadata opened for search (`TileIndex.open` for an index folder)."""

    def __init__(
        self,
        meta: dict[str, Any],
        tiles: pd.DataFrame,
        index: faiss.Index,
        vectors: np.ndarray,
        path: Path,
    ):
        """`vectors`: all rows (a memory map for big indexes), for tile queries (`vector`):
        IVF cannot hand back a stored vector without an extra id map in RAM."""
        self.meta, self.tiles, self.faiss, self.path = meta, tiles, index, Path(path)
        self.vectors = vectors
        self._rows = {t: i for i, t in enumerate(tiles["tile_id"])}

    @classmethod
    def open(cls, path: Path) -> TileIndex:
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise SearchIndexError(f"{path} is not a tile index (no {META_FILE}); run geoseg index")
        meta = yaml.safe_load(meta_path.read_text())
        if meta.get("state") != "complete":
            raise SearchIndexError(f"index {path} is incomplete; rerun geoseg index to finish it")
        tiles = gpd.read_parquet(path / METADATA_FILE)
        vectors = np.load(path / VECTORS_FILE, mmap_mode="r")
        return cls(meta, tiles, faiss.read_index(str(path / FAISS_FILE)), vectors, path)

    @property
    def data(self) -> Path:
        return Path(self.meta["data"])

    @property
    def probes(self) -> int | None:
        """IVF lists probed by an unfiltered query (filtered ones scale it up); None = exact."""
        if self.meta.get("kind") != "ivf":
            return None
        return faiss.extract_index_ivf(self.faiss).nprobe

    @probes.setter
    def probes(self, value: int) -> None:
        """More probes = better recall, slower (docs/benchmarks.md); an exact index ignores it."""
        if value < 1:
            raise SearchIndexError(f"probes must be >= 1, not {value}")
        if self.meta.get("kind") == "ivf":
            ivf = faiss.extract_index_ivf(self.faiss)
            ivf.nprobe = min(value, ivf.nlist)

    def check_model(self, fingerprint: str) -> None:
        """Refuse to compare vectors of two different models."""
        if fingerprint != self.meta["fingerprint"]:
            raise SearchIndexError(
                f"index {self.path} was built with another model "
                f"({self.meta['model']}, fingerprint {self.meta['fingerprint']}, "
                f"not {fingerprint}); rebuild it with geoseg index"
            )

    def row(self, tile_id: str) -> int:
        if tile_id not in self._rows:
            raise SearchIndexError(f"unknown tile id {tile_id!r} (not in index {self.path})")
        return self._rows[tile_id]

    def vector(self, tile_id: str) -> np.ndarray:
        return np.array(self.vectors[self.row(tile_id)])

    def predicted_shares(self) -> dict[str, np.ndarray]:
        """Class -> (N,) shares predicted from the tiles' images (`pred_<class>` columns,
        `retrieval.amounts`); empty for an index whose embedder has no composition head."""
        return {
            c.removeprefix(PREDICTED): self.tiles[c].to_numpy(np.float64)
            for c in self.tiles.columns
            if c.startswith(PREDICTED)
        }

    @cached_property
    def label_facts(self) -> dict[str, np.ndarray]:
        """What amounts are checked against in a labelled archive (`retrieval.amounts.
        label_shares`), vectorised over the metadata's `frac_` and `stat_` columns; computed
        once per opened index (a serving engine keeps the index open across searches)."""
        from retrieval.amounts import LABEL_STATS, label_shares

        unknown = np.full(len(self.tiles), np.nan)
        fractions = {
            c.removeprefix("frac_"): self.tiles[c].to_numpy(np.float64)
            for c in self.tiles.columns
            if c.startswith("frac_")
        }
        stats = {
            k: self.tiles[f"stat_{k}"].to_numpy(np.float64)
            if f"stat_{k}" in self.tiles
            else unknown
            for k in LABEL_STATS
        }
        return label_shares(fractions, stats)

    def tile_info(self, row: int) -> TileInfo:
        """The label facts of an indexed tile, read back from its metadata row (`metadata_frame`):
        what its document (`retrieval.captions.document`) is written from."""
        record = self.tiles.iloc[row]
        classes = tuple(
            c.removeprefix("frac_") for c in self.tiles.columns if c.startswith("frac_")
        )
        stats = {
            k.removeprefix("stat_"): None if pd.isna(v) else float(v)
            for k, v in record.items()
            if k.startswith("stat_")
        }
        return TileInfo(
            tile_id=record["tile_id"],
            split=str(record["split"]),
            bbox=(record["west"], record["south"], record["east"], record["north"]),
            crs=record["crs"],
            year=int(record["year"]),
            class_fractions={c: float(record[f"frac_{c}"]) for c in classes},
            stats=stats,
            classes=classes,
        )

    def search(
        self,
        queries: np.ndarray,
        k: int,
        filters: Filters = Filters(),
        exclude: Sequence[str] = (),
        within: np.ndarray | None = None,
    ) -> list[list[tuple[int, float]]]:
        """Top-k (row, score) per query vector, best first, within the filters (and the rows
        `within`, an (N,) bool mask, when given)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.faiss.d)
        mask = filters.mask(self.tiles)
        if within is not None:
            mask = within.copy() if mask is None else mask & within
        if exclude:  # unknown ids raise, as in `row`
            mask = np.ones(len(self.tiles), bool) if mask is None else mask
            mask[[self.row(t) for t in exclude]] = False
        if mask is None:
            return self._search(queries, k, None)
        allowed = int(mask.sum())
        if allowed == 0:
            return [[] for _ in queries]
        bitmap = np.packbits(mask, bitorder="little")  # both alive during the searches
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        hits = self._search(
            queries, k, selector, exact=allowed <= EXACT_SUBSET_MAX, matching=allowed
        )
        # Unlucky IVF lists can hold fewer than k matches: answer those queries exactly.
        short = [i for i, h in enumerate(hits) if len(h) < min(k, allowed)]
        if short:
            redo = self._search(queries[short], k, selector, exact=True)
            for i, h in zip(short, redo, strict=True):
                hits[i] = h
        return hits

    def _search(
        self,
        queries: np.ndarray,
        k: int,
        selector: faiss.IDSelector | None,
        exact: bool = False,
        matching: int = 0,
    ) -> list[list[tuple[int, float]]]:
        """faiss search restricted to `selector`. faiss tests the selector before computing a
        distance, so an exact answer (flat, or IVF probing every list) costs one id check per
        tile plus one dot product per *matching* tile; else IVF probes scaled by 1 / matching
        share see as many matching vectors as an unfiltered search would."""
        if selector is None:
            params = None
        elif self.meta.get("kind") != "ivf":
            params = faiss.SearchParameters(sel=selector)
        else:
            ivf = faiss.extract_index_ivf(self.faiss)
            nprobe = ivf.nlist if exact else math.ceil(ivf.nprobe * self.faiss.ntotal / matching)
            params = faiss.SearchParametersIVF(sel=selector, nprobe=min(ivf.nlist, nprobe))
        scores, rows = self.faiss.search(queries, k, params=params)
        return [_pairs(rr, ss) for rr, ss in zip(rows, scores, strict=True)]


def _pairs(rows: np.ndarray, scores: np.ndarray) -> list[tuple[int, float]]:
    """faiss result row -> (row, score) pairs, dropping the -1 padding of short results."""
    return [(int(r), float(s)) for r, s in zip(rows, scores, strict=True) if r >= 0]
