"""``imgalign eval-reward``: a reward against human preferences.

    imgalign eval-reward --reward runs/reward/reward --data pairs.jsonl --out runs/eval
    imgalign eval-reward --reward hpsv2.1 --data groups.jsonl --out runs/eval-hps

Records are pairs (``image_a``, ``image_b``, ``label`` A/B/tie), K-way groups (``images``:
a list, ``ranking``: "C>A>B" or indices best first, and/or ``human_scores``: one per image)
or single items (``image`` + ``human_score``); ``prompt``/``instruction`` and
``source_image`` (edits) as usual. Reports pairwise accuracy without ties, accuracy with
ties (tie-calibrated epsilon, Deutsch et al. 2023), group accuracy per K, Spearman /
Kendall against human scores, the BT log-loss and a reliability plot. Writes
``report.json``, ``report.md``, ``reliability.png`` and ``predictions.jsonl`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
from itertools import combinations
from pathlib import Path

from imgalign.commands import CommandError, add_output_arguments, prepare_out, resolve_device

HELP = "Evaluate a reward against human preferences (accuracy, accuracy with ties, correlations)."
#: What eval-reward writes into --out (what --overwrite removes).
OUTPUTS = ("report.json", "report.md", "predictions.jsonl", "reliability.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", required=True, metavar="SPEC", help="reward name, weighted spec, or trained reward dir")
    parser.add_argument("--checkpoint", default=None, metavar="PATH")
    parser.add_argument("--data", required=True, metavar="FILE_OR_DIR", help="pairs / groups / scored items")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="predicted P(A preferred) = sigmoid((s_A - s_B) / T) for the reliability plot")
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", required=True, metavar="DIR", type=Path)
    add_output_arguments(parser, resumable=False)


def _images_of(record: dict) -> list:
    has = lambda key: record.get(key) is not None  # noqa: E731 -- Parquet / datasets rows hold None for absent fields
    if has("images"):
        return list(record["images"])
    for a, b in (("image_a", "image_b"), ("image_0", "image_1"), ("chosen_image", "rejected_image")):
        if has(a) and has(b):
            return [record[a], record[b]]
    if has("image"):
        return [record["image"]]
    raise ValueError(f"record has no images (fields: {', '.join(record)})")


def run(args) -> int:
    import torch
    from tqdm import tqdm

    import rewards
    from imgalign.commands.filter import _load_reward
    from imgalign.io import atomic_write_bytes
    from rewards import evaluation as E
    from rewards import preference as P

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.bins < 1:
        raise CommandError(f"--bins must be >= 1, got {args.bins}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise CommandError(f"--temperature must be a finite number > 0, got {args.temperature}")
    try:
        records = rewards.data.read_records(args.data)
    except rewards.data.DatasetFormatError as err:
        raise CommandError(f"--data: {err}") from None
    if not records:
        raise CommandError(f"--data {args.data}: no records")
    prepare_out(args, OUTPUTS, resumable=False, clear=False)  # a used --out only with --overwrite
    device = torch.device(resolve_device(args.device))
    reward = _load_reward(args.reward, args.checkpoint).to(device).eval()
    base_dir = rewards.data.base_dir(args.data)
    prompt_keys = ("prompt", "instruction", "caption", "text")
    source_keys = ("source_image", "source", "input_image")

    def present(record: dict, keys) -> object:  # Parquet / datasets rows hold None for absent fields
        return next((record[k] for k in keys if record.get(k) is not None), None)

    # Images are scored in batches of the same size (and source size), whatever record they
    # come from; a batch is scored once it is full, and everything pending once more than
    # a few batches' worth of images wait (images of many sizes), so memory stays bounded.
    scores: list[list[float | None]] = []
    pending: dict[tuple, list] = {}  # (image shape, source shape) -> [(record, position, image, prompt, source)]
    waiting = 0

    def score_group(items: list) -> None:
        images = torch.cat([it[2] for it in items])
        prompts = [it[3] for it in items] if reward.info.needs_prompts else None
        cond = {"source_images": torch.cat([it[4] for it in items])} if items[0][4] is not None else {}
        try:
            values = reward.score_batched(images, prompts, batch_size=args.batch_size, **cond).tolist()
        except (OSError, ValueError) as group_err:
            for it in items:  # name the record that fails
                try:
                    reward.score_batched(it[2], [it[3]] if prompts is not None else None, batch_size=1,
                                         **({"source_images": it[4]} if it[4] is not None else {}))
                except (OSError, ValueError) as err:
                    raise CommandError(f"{args.data}: record {it[0] + 1}: {err}") from None
            raise CommandError(f"{args.data}: {group_err}") from None
        for it, value in zip(items, values):
            scores[it[0]][it[1]] = float(value)

    def flush(key=None) -> None:
        nonlocal waiting
        for k in [key] if key is not None else list(pending):
            items = pending.pop(k)
            waiting -= len(items)
            score_group(items)

    for number, record in enumerate(tqdm(records, desc="eval-reward", unit="record", disable=None), 1):
        try:
            images = [rewards.data.load_image_value(v, base_dir) for v in _images_of(record)]
            prompt = present(record, prompt_keys)
            source = present(record, source_keys)
            source_image = None
            if "source_images" in reward.info.inputs:
                if source is None:
                    raise ValueError("this reward scores edits: the record has no source_image")
                source_image = rewards.data.load_image_value(source, base_dir)
        except (OSError, ValueError) as err:
            raise CommandError(f"{args.data}: record {number}: {err}") from None
        scores.append([None] * len(images))
        for position, image in enumerate(images):  # images of one record may differ in size
            key = (tuple(image.shape), tuple(source_image.shape) if source_image is not None else None)
            pending.setdefault(key, []).append((number - 1, position, image, prompt, source_image))
            waiting += 1
            if len(pending[key]) >= args.batch_size:
                flush(key)
        if waiting > 4 * args.batch_size:
            flush()
    flush()
    predictions = [{"record": i, "scores": s, **{k: record[k] for k in ("label", "ranking", "human_scores", "human_score")
                                                 if record.get(k) is not None}}
                   for i, (record, s) in enumerate(zip(records, scores))]

    h, m, probs, outcomes, groups, human, pred = [], [], [], [], {}, [], []
    for p in predictions:
        scores = p["scores"]
        k = len(scores)
        try:
            target = P.label_to_target(p["label"]) if "label" in p and k == 2 else None
            # a label of any form train-reward accepts (A/B/tie, 1/0/0.5, a probability) is a 2-way ranking
            ranking = (E.parse_ranking(p["ranking"], k) if "ranking" in p
                       else None if target is None else "tie" if target == 0.5 else (0, 1) if target > 0.5 else (1, 0))
        except (ValueError, TypeError) as err:
            raise CommandError(f"--data {args.data}: record {p['record'] + 1}: {err}") from None
        if target is not None:
            h.append(0 if target == 0.5 else (1 if target > 0.5 else -1))
            m.append(scores[0] - scores[1])
        if ranking is not None:
            groups.setdefault(k, []).append((scores, ranking))
            if k > 2:  # every pair of a ranked group also counts pairwise (EditReward-Bench)
                position = {item: r for r, item in enumerate(ranking)}
                for i, j in combinations(range(k), 2):
                    h.append(1 if position[i] < position[j] else -1)
                    m.append(scores[i] - scores[j])
        if "human_scores" in p:
            human.extend(p["human_scores"])
            pred.extend(scores)
        elif "human_score" in p and k == 1:
            human.append(p["human_score"])
            pred.append(scores[0])
    for hi, mi in zip(h, m):
        probs.append(1 / (1 + math.exp(-max(-60.0, min(60.0, mi / args.temperature)))))
        outcomes.append({1: 1.0, -1: 0.0, 0: 0.5}[hi])

    report: dict = {"reward": args.reward, "data": args.data, "records": len(records), "pairs": len(h)}
    if h:
        acc_ties, eps = E.accuracy_with_ties(h, m)
        report.update(pairwise_accuracy=E.pairwise_accuracy(h, m), accuracy_with_ties=acc_ties, tie_epsilon=eps,
                      human_ties=sum(1 for x in h if x == 0))
        decided = [(p, o) for p, o in zip(probs, outcomes) if o != 0.5]
        if decided:
            report["bt_log_loss"] = -sum(math.log(max(p if o == 1 else 1 - p, 1e-12)) for p, o in decided) / len(decided)
        curve = E.reliability(probs, outcomes, args.bins)
        report["ece"] = curve["ece"]
        report["reliability"] = curve
    eps = report.get("tie_epsilon", 0.0)
    report["group_accuracy"] = {str(k): {"accuracy": E.group_accuracy(g, eps), "groups": len(g)}
                                for k, g in sorted(groups.items())}
    if human:
        report["spearman"] = E.spearman(pred, human)
        report["kendall_tau"] = E.kendall_tau(pred, human)
        report["scored_items"] = len(human)

    rows = [{"metric": "pairwise accuracy (without ties)", "value": report.get("pairwise_accuracy"), "n": len(h)},
            {"metric": "accuracy with ties", "value": report.get("accuracy_with_ties"), "n": len(h)},
            {"metric": "tie epsilon", "value": report.get("tie_epsilon"), "n": None},
            {"metric": "BT log-loss", "value": report.get("bt_log_loss"), "n": None},
            {"metric": "ECE", "value": report.get("ece"), "n": None}]
    for k, g in report["group_accuracy"].items():
        rows.append({"metric": f"group accuracy K={k}", "value": g["accuracy"], "n": g["groups"]})
    if human:
        rows += [{"metric": "Spearman", "value": report["spearman"], "n": len(human)},
                 {"metric": "Kendall tau-b", "value": report["kendall_tau"], "n": len(human)}]
    rows = [r for r in rows if r["value"] is not None]
    table = E.format_markdown_table(rows, ["metric", "value", "n"])
    out = Path(args.out)
    if args.overwrite:
        from imgalign.outputs import clear_outputs

        clear_outputs(out, OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "report.json", (E.to_json(report) + "\n").encode())
    atomic_write_bytes(out / "report.md", (f"# {args.reward} on {args.data}\n\n{table}\n").encode())
    atomic_write_bytes(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions).encode())
    if h:
        E.plot_reliability(report["reliability"], out / "reliability.png", title=f"{args.reward}")
    print(table)
    print(f"report: {out / 'report.json'}, {out / 'report.md'}" + (f", {out / 'reliability.png'}" if h else ""))
    return 0
