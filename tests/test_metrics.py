"""Evaluation metrics against rankings computed by hand."""
import pytest
import torch

from fitclip_ext import metrics


def test_retrieval_metrics_hand_computed():
    # texts x videos; text i describes video i
    sim = torch.tensor([[0.9, 0.1, 0.3],    # t0: video 0 first -> rank 1
                        [0.8, 0.5, 0.6],    # t1: video 1 third -> rank 3
                        [0.2, 0.7, 0.4]])   # t2: video 2 second -> rank 2
    m = metrics.retrieval_metrics(sim)
    assert m["t2v_r1"] == pytest.approx(100 / 3) and m["t2v_r5"] == 100.0
    assert m["t2v_mdr"] == 2 and m["t2v_mnr"] == 2
    # video-to-text: v0 column [0.9, 0.8, 0.2] -> t0 rank 1; v1 [0.1, 0.5, 0.7] -> t1 rank 2; v2 [0.3, 0.6, 0.4] -> t2 rank 2
    assert m["v2t_r1"] == pytest.approx(100 / 3) and m["v2t_mdr"] == 2 and m["v2t_mnr"] == pytest.approx(5 / 3)


def test_retrieval_with_several_texts_per_video():
    sim = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.4]])  # texts 0, 1 -> video 0; text 2 -> video 1
    m = metrics.retrieval_metrics(sim, torch.tensor([0, 0, 1]))
    assert m["t2v_r1"] == pytest.approx(200 / 3)  # t0 ranks video 0 second; t1, t2 first
    # v0 column [0.1, 0.8, 0.3]: best of its texts (t1) ranks 1; v1 column [0.9, 0.2, 0.4]: t2 ranks 2
    assert m["v2t_r1"] == 50.0 and m["v2t_mnr"] == 1.5


def test_ties_count_for_the_target():
    assert metrics.ranks_of_targets(torch.tensor([[0.5, 0.5, 0.1]]), torch.tensor([1])).item() == 1


def test_classification_top1_top5():
    logits = torch.zeros(2, 7)
    logits[0, 3] = 1.0           # sample 0, label 3: top-1
    logits[1] = torch.arange(7.)  # sample 1, label 1: rank 6 -> not in top-5
    m = metrics.classification_metrics(logits, torch.tensor([3, 1]))
    assert m == {"top1": 50.0, "top5": 50.0}


def test_ucf101_templates_and_prompt_ensembling():
    templates = metrics.ucf101_templates()
    assert len(templates) == 48 and len(set(templates)) == 48
    assert "a video of the person practicing {}." in templates

    def encode(texts):  # a fake text tower: one-hot of the text's length parity, plus name length
        return torch.tensor([[len(t) % 2, 1.0, len(t.split()) / 10] for t in texts])

    emb = metrics.class_embeddings(encode, ["apply eye makeup", "yo yo"], templates)
    assert emb.shape == (2, 3)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
