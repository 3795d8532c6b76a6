"""Zero-shot evaluation metrics: text-to-video / video-to-text retrieval and action recognition.

Ranks are 1-based: the rank of the correct item is 1 + the number of items scored strictly
higher (ties resolve in the correct item's favour, the usual convention of CLIP evaluations).
"""
from __future__ import annotations

import torch

def ucf101_templates() -> list[str]:
    """CLIP's 48 UCF101 prompt templates: {photo, video, example, demonstration} x 12 phrasings
    ("a/the person", "using", "doing", "during", "performing", "practicing"); "{}" takes the class
    name with CamelCase split into words (data.split_camel_case)."""
    kinds = ("photo", "video", "example", "demonstration")
    forms = ["a {} of a person {{}}.", "a {} of the person {{}}.", "a {} of a person using {{}}.",
             "a {} of the person using {{}}.", "a {} of a person doing {{}}.", "a {} of the person doing {{}}.",
             "a {} of a person during {{}}.", "a {} of the person during {{}}.", "a {} of a person performing {{}}.",
             "a {} of the person performing {{}}.", "a {} of a person practicing {{}}.",
             "a {} of the person practicing {{}}."]
    return [f.format(k) for k in kinds for f in forms]


def ranks_of_targets(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores [Q, N], targets [Q] (index of the correct item) -> 1-based ranks [Q]."""
    if scores.dim() != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [Q, N] and targets [Q], got {tuple(scores.shape)} and {tuple(targets.shape)}")
    target_scores = scores.gather(1, targets[:, None].long())
    return (scores > target_scores).sum(1) + 1


def rank_summary(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    r = ranks.double()
    return {f"{prefix}_r1": 100 * (r <= 1).double().mean().item(), f"{prefix}_r5": 100 * (r <= 5).double().mean().item(),
            f"{prefix}_r10": 100 * (r <= 10).double().mean().item(), f"{prefix}_mdr": r.median().item(),
            f"{prefix}_mnr": r.mean().item()}


def retrieval_metrics(sim: torch.Tensor, text_to_video: torch.Tensor | None = None) -> dict[str, float]:
    """sim [num_texts, num_videos]; text_to_video [num_texts] gives each text's video (default:
    text i describes video i). Text-to-video: the rank of each text's video. Video-to-text: for
    each video, the best rank among its texts. R@1/5/10 in percent, median and mean rank."""
    sim = sim.detach().float().cpu()
    T, V = sim.shape
    if text_to_video is None:
        if T != V:
            raise ValueError(f"sim is {T} x {V}: pass text_to_video when texts and videos differ in number")
        text_to_video = torch.arange(T)
    text_to_video = text_to_video.long().cpu()
    out = rank_summary(ranks_of_targets(sim, text_to_video), "t2v")
    # video-to-text: rank of every text within its video's row, then the best per video
    v_scores = sim.T  # [V, T]
    own = sim.gather(1, text_to_video[:, None])  # [T, 1]: each text's score with its video
    text_ranks = (v_scores[text_to_video] > own).sum(1) + 1  # among all texts, for that video
    best = torch.full((V,), T + 1, dtype=torch.long)
    best.scatter_reduce_(0, text_to_video, text_ranks, reduce="amin")
    has_text = torch.zeros(V, dtype=torch.bool)
    has_text[text_to_video] = True
    out.update(rank_summary(best[has_text], "v2t"))
    return out


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """logits [N, K], labels [N] -> top-1 and top-5 accuracy in percent."""
    ranks = ranks_of_targets(logits.detach().float().cpu(), labels.cpu())
    return {"top1": 100 * (ranks <= 1).double().mean().item(), "top5": 100 * (ranks <= 5).double().mean().item()}


@torch.no_grad()
def class_embeddings(encode_text, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """[K, D]: for each class, the text embeddings of every template filled with its name,
    normalised, averaged, normalised again (CLIP's prompt ensembling)."""
    out = []
    for name in class_names:
        emb = torch.nn.functional.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        out.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    return torch.stack(out)
