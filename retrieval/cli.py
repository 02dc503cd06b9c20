"""`geoseg index / search / evaluate-retrieval / train-retrieval`: thin wrappers over retrieval/.

geoseg never imports this package; `geoseg.cli` adds these commands through the
`geoseg.commands` entry-point group (pyproject.toml). Module import stays light (click only),
because every `geoseg` invocation loads it. Exit codes as in geoseg: 2 bad input, 1 job failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

EXIT_BAD_INPUT = 2
DEVICE_HELP = "auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda, cuda:N or mps."


def _fail(message: str, code: int) -> None:
    click.echo(f"geoseg: error: {message}", err=True)
    sys.exit(code)


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from retrieval.index import SearchIndexError

    return (SearchIndexError, FileNotFoundError, ValueError)


@click.command("index")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Build folder.")
@click.option(
    "--model",
    required=True,
    help="Embedder folder, train-retrieval run, HF id or open_clip:ARCH:PRETRAINED.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Index folder.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--kind",
    type=click.Choice(["auto", "flat", "ivf"]),
    default="auto",
    show_default=True,
    help="auto = exact up to 50k tiles, IVF above.",
)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def index_cmd(
    data: Path, model: str, out: Path, batch_size: int, kind: str, device: str, no_progress: bool
) -> None:
    """Embed every tile of a build folder into a searchable index (rerun to resume).

    Writes vectors (faiss) and tile metadata (GeoParquet) to --out, with the model's
    fingerprint so searches with another model are refused.
    """
    from geoseg.errors import first_line
    from retrieval.index import build_index, open_embedder

    model = _embedder_ref(model)
    try:
        embedder = open_embedder(model, device=device)
        build_index(
            data,
            embedder,
            out,
            model=model,
            batch_size=batch_size,
            kind=kind,
            progress=not no_progress,
            echo=lambda m: click.echo(m, err=True),
        )
    except _bad_input_errors() as exc:
        _fail(first_line(exc), EXIT_BAD_INPUT)
    click.echo(f"indexed {data} with {model}: {out}")


def _embedder_ref(model: str) -> str:
    """A train-retrieval run folder stands for its `embedder/`; `open_clip:` refs stay."""
    if model.startswith("open_clip:"):
        return model
    path = Path(model)
    if (path / "embedder").is_dir():
        path = path / "embedder"
    return str(path.resolve()) if path.exists() else model  # else an HF id


@click.command("search")
@click.argument("text", required=False)
@click.option("--index", "index_path", required=True, type=click.Path(path_type=Path))
@click.option("--like", metavar="TILE_ID", help="Find tiles like this indexed tile.")
@click.option("--image", type=click.Path(path_type=Path), help="Find tiles like this GeoTIFF.")
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--bbox", nargs=4, type=float, metavar="W S E N", help="lon/lat box to search in.")
@click.option("--split", help="Only tiles of this split (train/val/test/buffer).")
@click.option("--year", type=int, help="Only tiles of this imagery year.")
@click.option(
    "--probes",
    type=click.IntRange(min=1),
    help="IVF lists probed per query [the index's]: more = better recall, slower. "
    "Exact (small) indexes ignore it.",
)
@click.option(
    "--rescore",
    type=click.IntRange(min=0),
    help="Re-order a text query's top N hits by their tiles' best-matching document phrase; "
    "0 = off [retrieval.rescore.RESCORE_TOP: 50].",
)
@click.option(
    "--amounts/--no-amounts",
    default=True,
    show_default=True,
    help="Rank first the tiles known to meet the amounts and measures a text query states "
    "('a few trees', 'no buildings', 'trees over 30 m', 'flat'; retrieval.amounts): checked on "
    "the tiles' label facts when the index fuses documents, else on image-predicted shares.",
)
@click.option("--rerank", is_flag=True, help="Rerank the top 5 with the run's reranker.")
@click.option("--reranker", type=click.Path(path_type=Path), help="Reranker folder [run's].")
@click.option("--model", help="Embedder to embed the query [the index's].")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="hits.geojson")
@click.option("--thumbnails", type=click.Path(path_type=Path), help="PNG grid [OUT.png].")
@click.option(
    "--no-thumbnails",
    is_flag=True,
    help="No PNG grid: most of a warm search's time (the QGIS dock draws its own thumbnails).",
)
def search_cmd(
    text: str | None,
    index_path: Path,
    like: str | None,
    image: Path | None,
    k: int,
    bbox: tuple[float, float, float, float] | None,
    split: str | None,
    year: int | None,
    probes: int | None,
    rescore: int | None,
    amounts: bool,
    rerank: bool,
    reranker: Path | None,
    model: str | None,
    device: str,
    out: Path,
    thumbnails: Path | None,
    no_thumbnails: bool,
) -> None:
    """Search an index with TEXT, --like TILE_ID or --image FILE.

    Writes the ranked hits (score, tile id, lon/lat outline, metadata) as GeoJSON to --out and
    a thumbnail grid PNG beside it.
    """
    from geoseg.errors import first_line
    from retrieval.index import Filters, TileIndex
    from retrieval.search import Query, search, write_geojson, write_thumbnails

    query = Query(text, like, image, Filters(tuple(bbox) if bbox else None, split, year))
    try:
        index = TileIndex.open(index_path)
        if probes:
            index.probes = probes
        if rerank and reranker is None:
            reranker = Path(index.meta["model"]).parent / "reranker"
            if not reranker.is_dir():
                raise FileNotFoundError(f"no reranker at {reranker}; give --reranker")
        hits = search(
            index,
            query,
            k,
            model=_embedder_ref(model) if model else None,
            reranker=reranker if rerank else None,
            device=device,
            amounts=amounts,
            **({} if rescore is None else {"rescore": rescore}),
        )
    except _bad_input_errors() as exc:
        _fail(first_line(exc), EXIT_BAD_INPUT)
    described = {"text": text, "like": like, "image": str(image) if image else None}
    write_geojson(hits, out, {k: v for k, v in described.items() if v is not None})
    written = [out]
    if not no_thumbnails:
        written.append(thumbnails or out.with_suffix(".png"))
        write_thumbnails(hits, index.data, written[-1], text or like or str(image))
    for h in hits[:10]:
        rerank_score = "" if h.rerank is None else f"  rerank {h.rerank:+.3f}"
        click.echo(f"{h.rank:3d}  {h.score:.4f}  {h.tile_id}{rerank_score}")
    click.echo(f"{len(hits)} hits: {', '.join(map(str, written))}")


@click.command("evaluate-retrieval")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Build folder.")
@click.option(
    "--model",
    "models",
    required=True,
    multiple=True,
    help="Embedder, train-retrieval run or open_clip:ARCH:PRETRAINED (repeat to compare).",
)
@click.option(
    "--queries",
    type=click.Path(path_type=Path),
    help="Query file with label rules [retrieval/queries/eval.yaml].",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--out", required=True, type=click.Path(path_type=Path))
def evaluate_retrieval_cmd(
    data: Path, models: tuple[str, ...], queries: Path | None, seed: int, device: str, out: Path
) -> None:
    """Text → tile (hand-written queries, label rules) and tile → tile quality, with chance.

    P@10, hit@1/5/10 and nDCG@10 with 95 % bootstrap intervals over queries, on all tiles and
    on the tiles training never saw; runs with a reranker/ folder get a reranked row.
    """
    from geoseg.errors import first_line
    from retrieval.evaluate import evaluate_retrieval

    try:
        kwargs = {"queries": queries} if queries else {}
        evaluate_retrieval(data, list(models), out, seed=seed, device=device, **kwargs)
    except _bad_input_errors() as exc:
        _fail(first_line(exc), EXIT_BAD_INPUT)
    click.echo((out / "table.md").read_text().rstrip())


@click.command("train-retrieval")
@click.option("--config", required=True, type=click.Path(path_type=Path), help="YAML config.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Build folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder.")
@click.option("--max-steps", type=click.IntRange(min=1), help="Cap the steps of every stage.")
@click.option(
    "--stage",
    "stages",
    multiple=True,
    type=click.Choice(["generative", "contrastive", "judge", "reranker"]),
    help="Run only these stages (repeatable) [all].",
)
def train_retrieval_cmd(
    config: Path, data: Path, out: Path, max_steps: int | None, stages: tuple[str, ...]
) -> None:
    """Train the tile embedder (3 stages) and its reranker on a build folder; resumable.

    Writes out/config.yaml, out/embedder/, out/reranker/ and out/log.jsonl.
    """
    from geoseg.errors import first_line
    from retrieval.train import train_retrieval

    kwargs = {"stages": stages} if stages else {}
    try:
        run = train_retrieval(config, data, out, max_steps=max_steps, **kwargs)
    except _bad_input_errors() as exc:
        _fail(first_line(exc), EXIT_BAD_INPUT)
    click.echo(f"trained retrieval model: {run}")
