"""Reward-based data curation: score every item of a dataset, keep the best.

Why it is built this way:

* **Every item is accounted for.** Each input record gets one result: its score (and the
  per-reward components of a composite) or the error that stopped it (missing file,
  unreadable image, a reward that refused the input). Errors are never kept.
* **Resumable.** Results are written as they are produced, one small part file per batch
  (``parts/part-<first>-<last>.jsonl``, each written atomically). A restarted run
  (``imgalign filter ... --resume``) reads the parts, skips the indices already done and scores only the rest, so no item is scored
  twice and none is dropped, whatever moment the previous run was killed at. Tests stop a
  run at a known point with ``IMGALIGN_FILTER_FAIL_AFTER_PARTS=N`` (see :data:`FAULT_ENV`).
* **A reward that went away stops the run, it does not fail the items.** When the reward
  cannot be reached (``remote:http://...`` whose server died, after the client's bounded
  retries) the batch in hand is not written and the run stops with one line; ``--resume``
  against a running server scores what is left. Errors that belong to an item (its image,
  a reward that refuses that input) are still recorded as that item's result.
* **Data parallel.** Under ``accelerate launch`` each process takes every ``world``-th of the
  items still to do; the main process merges the parts once everyone is done. Selection
  happens only after the merge, so it does not depend on the number of processes.
* **Same format out as in.** The kept subset is written as JSONL / Parquet / a ``datasets``
  directory like the input, plus ``scores.jsonl`` (all items, in input order),
  ``summary.json`` and ``histogram.png``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from imgalign.io import atomic_write_bytes

__all__ = ["FAULT_ENV", "FilterSpec", "InjectedFault", "run_filter", "select"]

IMAGE_KEYS = ("image", "image_path", "edited_image", "path", "file", "file_name")
PROMPT_KEYS = ("prompt", "instruction", "caption", "text")
SOURCE_KEYS = ("source_image", "source", "input_image", "src_image")

#: Fault injection for tests: after this process has committed N parts, the run stops with
#: :class:`InjectedFault`. The disk then holds what a kill at that moment would leave, so a
#: resume test interrupts at a known point instead of racing a wall clock.
FAULT_ENV = "IMGALIGN_FILTER_FAIL_AFTER_PARTS"


class InjectedFault(RuntimeError):
    """The stop asked for by :data:`FAULT_ENV`; never raised otherwise."""


def _parts_before_fault() -> int | None:
    value = os.environ.get(FAULT_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{FAULT_ENV} must be a number of parts >= 1, got {value!r}; unset it for a normal run")
    return int(value)


@dataclass
class FilterSpec:
    """What ``imgalign filter`` was asked to do (also written to ``run.json`` to guard resumes)."""

    data: str
    out: str
    reward: str
    checkpoint: str | None = None
    top_fraction: float | None = None
    threshold: float | None = None
    per: str = "global"  # or "prompt"
    image_key: str | None = None
    prompt_key: str | None = None
    source_key: str | None = None
    batch_size: int = 8
    bins: int = 30
    resolved_keys: dict = field(default_factory=dict)

    def identity(self) -> dict:
        """The settings a resumed run must share with the run it continues (scoring only)."""
        return {"data": str(Path(self.data).resolve()), "reward": self.reward, "checkpoint": self.checkpoint,
                "image_key": self.resolved_keys.get("image"), "prompt_key": self.resolved_keys.get("prompt"),
                "source_key": self.resolved_keys.get("source")}


# -- parts -----------------------------------------------------------------------------------
def _parts_dir(out: Path) -> Path:
    return out / "parts"


def read_parts(out: Path) -> dict[int, dict]:
    """All results written so far, by input index (temporary files of a killed run are ignored)."""
    results: dict[int, dict] = {}
    parts = _parts_dir(out)
    if not parts.is_dir():
        return results
    for part in sorted(parts.glob("part-*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                if record["index"] in results:
                    raise RuntimeError(f"item {record['index']} appears twice in {parts}: the parts are corrupt")
                results[record["index"]] = record
    return results


def _write_part(out: Path, results: list[dict]) -> None:
    first, last = results[0]["index"], results[-1]["index"]
    data = "".join(json.dumps(r) + "\n" for r in results).encode()
    atomic_write_bytes(_parts_dir(out) / f"part-{first:09d}-{last:09d}.jsonl", data)


# -- scoring ---------------------------------------------------------------------------------
def _load_item(record: dict, keys: dict, base_dir: Path, needs_source: bool):
    import rewards

    image = rewards.data.load_image_value(record[keys["image"]], base_dir)
    cond = {}
    if needs_source:
        value = record.get(keys["source"]) if keys.get("source") else None
        if value is None:
            raise ValueError("no source image for this edit item")
        cond["source_images"] = rewards.data.load_image_value(value, base_dir)
    return image, cond


#: A reward that cannot be reached (a reward server that went away, after the client's retries): not
#: the items' fault, so the run stops with the batch unwritten and ``--resume`` scores it later.
UNREACHABLE = (ConnectionError, TimeoutError)


def _score_batch(reward, items: list[tuple[int, object, dict, str | None]]) -> dict[int, dict]:
    """Score loaded items grouped by shape; a failing group is retried item by item.

    An unreachable reward (:data:`UNREACHABLE`) is raised instead: recording it as every item's
    error would turn a server restart into a dataset of failures.
    """
    import torch

    device = reward.device
    out: dict[int, dict] = {}
    groups: dict[tuple, list] = {}
    for item in items:
        index, image, cond, prompt = item
        key = (tuple(image.shape), *((k, tuple(v.shape)) for k, v in sorted(cond.items())))
        groups.setdefault(key, []).append(item)

    def run(group):
        images = torch.cat([g[1] for g in group]).to(device)
        cond = {k: torch.cat([g[2][k] for g in group]).to(device) for k in group[0][2]}
        prompts = [g[3] for g in group] if reward.info.needs_prompts else None
        with torch.no_grad():
            comps = reward.score_components(images, prompts, **cond)
        for j, g in enumerate(group):
            total = float(comps["total"][j])
            if not math.isfinite(total):
                out[g[0]] = {"error": f"reward returned {total}"}
                continue
            out[g[0]] = {"score": total, "scores": {n: float(v[j]) for n, v in comps.items() if n != "total"}}

    for group in groups.values():
        try:
            run(group)
        except UNREACHABLE:
            raise
        except Exception:
            for item in group:  # find the item that fails; the rest still get scores
                try:
                    run([item])
                except UNREACHABLE:
                    raise
                except Exception as err:
                    out[item[0]] = {"error": f"{type(err).__name__}: {_one_line(err)}"}
    return out


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def score_items(reward, records: list[dict], indices: Sequence[int], spec: FilterSpec, out: Path,
                show_progress: bool = True) -> None:
    """Score ``indices`` in batches, writing one part per batch."""
    from tqdm import tqdm

    import rewards

    keys = spec.resolved_keys
    base_dir = rewards.data.base_dir(spec.data)
    needs_source = "source_images" in reward.info.inputs
    fail_after = _parts_before_fault()
    with tqdm(total=len(indices), desc="filter", unit="item", disable=None if show_progress else True) as bar:  # terminal only
        for written, start in enumerate(range(0, len(indices), spec.batch_size), start=1):
            batch = indices[start:start + spec.batch_size]
            results: dict[int, dict] = {}
            loaded = []
            for index in batch:
                record = records[index]
                prompt = record.get(keys["prompt"]) if keys.get("prompt") else None
                try:
                    if reward.info.needs_prompts and not isinstance(prompt, str):
                        raise ValueError(f"no prompt ({keys.get('prompt') or 'prompt'} field) for this item")
                    image, cond = _load_item(record, keys, base_dir, needs_source)
                    loaded.append((index, image, cond, prompt))
                except Exception as err:  # missing file, unreadable image: recorded, run goes on
                    results[index] = {"error": f"{type(err).__name__}: {_one_line(err)}"}
            results.update(_score_batch(reward, loaded))
            _write_part(out, [{"index": i, **results[i]} for i in batch])
            bar.update(len(batch))
            if written == fail_after:
                raise InjectedFault(f"{FAULT_ENV}={fail_after}: stopped after {written} part(s), as asked")


# -- selection -------------------------------------------------------------------------------
def select(results: dict[int, dict], groups: dict[int, str] | None, top_fraction: float | None = None,
           threshold: float | None = None) -> tuple[set[int], dict]:
    """Indices to keep: scores ``>= threshold``, or the top ``ceil(fraction * n)`` per group.

    Ties at the cut are broken by input order (lower index first), so the result is a pure
    function of the scores. ``groups`` maps index -> group (e.g. the prompt); ``None`` is global.
    """
    scored = {i: r["score"] for i, r in results.items() if "score" in r}
    if threshold is not None:
        return {i for i, s in scored.items() if s >= threshold}, {"threshold": threshold}
    if top_fraction is None or not 0 < top_fraction <= 1:
        raise ValueError(f"top fraction must be in (0, 1], got {top_fraction}")
    by_group: dict[str, list[int]] = {}
    for i in scored:
        by_group.setdefault(groups[i] if groups is not None else "", []).append(i)
    kept: set[int] = set()
    cutoffs = {}
    for group, members in by_group.items():
        ranked = sorted(members, key=lambda i: (-scored[i], i))
        n_keep = math.ceil(top_fraction * len(ranked))
        kept.update(ranked[:n_keep])
        cutoffs[group] = scored[ranked[n_keep - 1]] if n_keep else None
    info = {"top_fraction": top_fraction}
    if groups is None:
        info["cutoff_score"] = cutoffs.get("")
    else:
        info["groups"] = len(by_group)
    return kept, info


# -- outputs ---------------------------------------------------------------------------------
def _rebase_paths(record: dict, path_keys: Sequence[str], src_dir: Path, dst_dir: Path) -> dict:
    """Relative image paths of ``record`` made relative to ``dst_dir`` so the copy still resolves."""
    out = dict(record)
    for key in path_keys:
        value = out.get(key)
        if isinstance(value, str) and value and not value.startswith("data:") and not os.path.isabs(value):
            out[key] = os.path.relpath((src_dir / value).resolve(), dst_dir.resolve())
    return out


def _rebase_table(table, path_keys: Sequence[str], src_dir: Path, dst_dir: Path):
    """:func:`_rebase_paths` for the string columns ``path_keys`` of an Arrow table."""
    import pyarrow as pa

    for key in path_keys:
        if key not in table.column_names:
            continue
        field_ = table.schema.field(key)
        if not (pa.types.is_string(field_.type) or pa.types.is_large_string(field_.type)):
            continue  # bytes or {"bytes", "path"} structs (the datasets Image feature) travel as they are
        values = [_rebase_paths({key: v}, [key], src_dir, dst_dir)[key] for v in table.column(key).to_pylist()]
        table = table.set_column(table.column_names.index(key), field_, pa.array(values, type=field_.type))
    return table


def write_kept(spec: FilterSpec, records: list[dict], kept: list[int], out: Path) -> Path:
    """The kept subset, in the input's format (relative image paths rebased to still resolve)."""
    import rewards

    fmt = rewards.data.dataset_format(spec.data)
    data = Path(spec.data)
    src_dir = rewards.data.base_dir(data)
    path_keys = [k for k in (spec.resolved_keys.get("image"), spec.resolved_keys.get("source")) if k]
    if fmt == "jsonl":
        lines = [json.dumps(_rebase_paths(records[i], path_keys, src_dir, out)) + "\n" for i in kept]
        target = out / "kept.jsonl"
        atomic_write_bytes(target, "".join(lines).encode())
        return target
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = _rebase_table(pq.read_table(str(data)).take(kept), path_keys, src_dir, out)
        target = out / "kept.parquet"
        tmp = out / ".kept.parquet.tmp"
        pq.write_table(table, str(tmp))
        os.replace(tmp, target)
        return target
    import datasets
    from datasets.table import InMemoryTable

    from imgalign.io import atomic_directory

    target = out / "kept"
    source = datasets.load_from_disk(str(data))
    # Take the rows at the Arrow level: select() + save_to_disk() would flatten the indices
    # through a cache file written into the *input* directory.
    table = _rebase_table(source.with_format("arrow")[kept], path_keys, src_dir, target)
    with atomic_directory(target) as tmp:
        datasets.Dataset(InMemoryTable(table), info=source.info.copy()).save_to_disk(str(tmp))
    return target


def plot_histogram(scores: list[float], kept_scores: list[float], path: Path, bins: int, title: str,
                   threshold: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if scores:
        edges = bins if len(set(scores)) > 1 else 1
        _, edges, _ = ax.hist(scores, bins=edges, color="lightgrey", label=f"all ({len(scores)})")
        ax.hist(kept_scores, bins=edges, color="tab:green", alpha=0.8, label=f"kept ({len(kept_scores)})")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"cut {threshold:.4g}")
    ax.set_xlabel("score")
    ax.set_ylabel("items")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:  # nothing scored and no threshold: no legend (and no warning)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def merge_and_select(spec: FilterSpec, records: list[dict], out: Path) -> dict:
    """Merge the parts, select, write every output; returns the summary."""
    results = read_parts(out)
    missing = [i for i in range(len(records)) if i not in results]
    if missing:
        raise RuntimeError(f"{len(missing)} item(s) have no result (first: {missing[0]}); rerun the same command")
    prompt_key = spec.resolved_keys.get("prompt")
    groups = None
    if spec.per == "prompt":
        if not prompt_key:
            raise ValueError("--per prompt needs a prompt field in the records")
        groups = {i: str(records[i].get(prompt_key)) for i in range(len(records))}
    kept_set, info = select(results, groups, spec.top_fraction, spec.threshold)
    kept = sorted(kept_set)
    lines = []
    for i, record in enumerate(records):
        row = {"index": i}
        if prompt_key:
            row["prompt"] = record.get(prompt_key)
        image = record.get(spec.resolved_keys["image"])
        if isinstance(image, str) and not image.startswith("data:"):
            row["image"] = image
        row.update({k: v for k, v in results[i].items() if k != "index"})
        row["kept"] = i in kept_set
        lines.append(json.dumps(row) + "\n")
    atomic_write_bytes(out / "scores.jsonl", "".join(lines).encode())
    kept_path = write_kept(spec, records, kept, out)
    scores = [r["score"] for r in results.values() if "score" in r]
    errors = len(records) - len(scores)
    plot_histogram(scores, [results[i]["score"] for i in kept], out / "histogram.png", spec.bins,
                   f"{spec.reward}: {len(kept)}/{len(records)} kept",
                   spec.threshold if spec.threshold is not None else info.get("cutoff_score"))
    summary = {"items": len(records), "scored": len(scores), "errors": errors, "kept": len(kept),
               "per": spec.per, **info, "kept_dataset": str(kept_path),
               "score_mean": sum(scores) / len(scores) if scores else None,
               "score_min": min(scores) if scores else None, "score_max": max(scores) if scores else None,
               "spec": {k: v for k, v in asdict(spec).items() if k != "resolved_keys"}}
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def resolve_keys(spec: FilterSpec, records: list[dict]) -> dict:
    import rewards

    find = rewards.data.find_key
    first = records[0]
    return {"image": find(first, spec.image_key, IMAGE_KEYS, "image"),
            "prompt": find(first, spec.prompt_key, PROMPT_KEYS, "prompt", required=False),
            "source": find(first, spec.source_key, SOURCE_KEYS, "source image", required=False)}


def check_run_file(spec: FilterSpec, out: Path, n_items: int) -> None:
    """Refuse to continue a run that scored a different dataset or reward in ``out``."""
    run_file = out / "run.json"
    identity = {**spec.identity(), "items": n_items}
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous != identity:
            changed = [k for k in identity if previous.get(k) != identity[k]]
            raise ValueError(f"--resume: {out} holds a run with different {', '.join(changed)}: use another --out, "
                             "or --overwrite to start over")
    else:
        atomic_write_bytes(run_file, (json.dumps(identity, indent=2) + "\n").encode())


def run_filter(spec: FilterSpec, reward, state=None) -> dict | None:
    """Score what is left (this process's share), then merge on the main process.

    ``state`` is an ``accelerate.PartialState`` (or ``None`` for one process). Returns the
    summary on the main process, ``None`` elsewhere.
    """
    import rewards

    records = rewards.data.read_records(spec.data)
    if not records:
        raise ValueError(f"dataset {spec.data} is empty")
    spec.resolved_keys = resolve_keys(spec, records)
    if reward.info.needs_prompts and not spec.resolved_keys["prompt"]:
        raise ValueError(f"reward {spec.reward!r} needs prompts: the records have no prompt field (--prompt-key)")
    if "source_images" in reward.info.inputs and not spec.resolved_keys["source"]:
        raise ValueError(f"reward {spec.reward!r} scores edits: the records have no source image field (--source-key)")
    out = Path(spec.out)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        check_run_file(spec, out, len(records))
    if state is not None:
        state.wait_for_everyone()
    done = read_parts(out)
    todo = [i for i in range(len(records)) if i not in done]
    mine = todo[rank::world]
    if state is not None:  # every process must split the same snapshot before anyone writes
        state.wait_for_everyone()
    if is_main and done:
        print(f"resuming: {len(done)} of {len(records)} item(s) already scored, {len(todo)} to go")
    score_items(reward, records, mine, spec, out, show_progress=is_main)
    if state is not None:
        state.wait_for_everyone()
    if not is_main:
        return None
    return merge_and_select(spec, records, out)
