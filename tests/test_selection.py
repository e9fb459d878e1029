"""The 3D selection rule of a text query (qrender_ns.features.selection) on a hand-made feature table: no model, no
training."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qrender_ns.features.selection import SelectionRule, competitor_texts, select_by_rule, wins_mask

WORDS = ["wall", "floor", "chair", "table", "object", "things", "armchair"]


class OneHotEncoder:
    """Each known word -> its own axis of R^8 (orthonormal), as a closed-vocabulary text encoder."""

    name = "one-hot"
    dim = 8

    def encode(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            out[i, WORDS.index(text.strip().lower())] = 1.0
        return out


def _axis(*pairs):
    v = torch.zeros(8)
    for word, weight in pairs:
        v[WORDS.index(word)] = weight
    return v


def _model(features, vocabulary=("wall", "floor", "chair", "table"), negatives=("object", "things")):
    return SimpleNamespace(gaussian_features=torch.stack(features), text_encoder=OneHotEncoder(),
                           class_names=list(vocabulary), config=SimpleNamespace(relevancy_negatives=tuple(negatives)))


# Gaussians: 0, 1 chair; 2 a wall Gaussian leaning to chair (relevancy vs the negatives high, loses to wall);
# 3 floor; 4 nearest to a canonical negative; 5 never supervised (zero feature); 6 table.
TABLE = [_axis(("chair", 1.0)), _axis(("chair", 0.8), ("table", 0.3)), _axis(("wall", 0.7), ("chair", 0.5)),
         _axis(("floor", 1.0), ("chair", 0.1)), _axis(("object", 0.9), ("chair", 0.4)), torch.zeros(8),
         _axis(("table", 1.0), ("chair", 0.2))]


def test_wins_picks_the_querys_gaussians_not_the_competitors():
    model = _model(TABLE)
    assert select_by_rule(model, "chair", SelectionRule()).tolist() == [True, True, False, False, False, False, False]
    assert select_by_rule(model, " Table", SelectionRule()).tolist() == [False] * 6 + [True]
    assert select_by_rule(model, "wall", SelectionRule()).tolist() == [False, False, True, False, False, False, False]
    # the old absolute rule on the same table also takes the chair-leaning wall Gaussian (relevancy vs the
    # negatives only): what the new rule fixes
    old = select_by_rule(model, "chair", SelectionRule("absolute", 0.55)).tolist()
    assert old[:3] == [True, True, True] and not old[5]
    # a query outside the vocabulary competes with all of it: the chair Gaussians are the vocabulary's chair's
    assert not select_by_rule(model, "armchair", SelectionRule()).any()


def test_wins_ties_and_zero_features_select_nothing():
    features = torch.stack([_axis(("chair", 0.5), ("wall", 0.5)), torch.zeros(8)])
    query, competitors = OneHotEncoder().encode(["chair"])[0], OneHotEncoder().encode(["wall", "object"])
    assert wins_mask(features, query, competitors).tolist() == [False, False]


def test_competitors_are_the_vocabulary_and_negatives_without_the_query():
    assert competitor_texts("Chair ", ["wall", "chair", "Wall"], ["object"]) == ["wall", "object"]
    assert competitor_texts("sofa", [], ["object", "things"]) == ["object", "things"]


def test_bad_input_is_one_sentence():
    with pytest.raises(ValueError, match="nothing to win against") as err:
        select_by_rule(_model(TABLE, vocabulary=(), negatives=()), "chair", SelectionRule())
    assert str(err.value).count(". ") == 0 and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="nothing to win against"):  # the query is the whole vocabulary
        select_by_rule(_model(TABLE, vocabulary=("chair",), negatives=()), "chair", SelectionRule())
    with pytest.raises(ValueError, match="finite relevancy threshold"):
        select_by_rule(_model(TABLE), "chair", SelectionRule("absolute", float("nan")))
    with pytest.raises(ValueError, match="one of wins, absolute"):
        select_by_rule(_model(TABLE), "chair", SelectionRule("maybe"))
    with pytest.raises(ValueError, match="at least one competitor"):
        wins_mask(torch.ones(2, 8), torch.ones(8), torch.zeros(0, 8))
    # negatives alone still make a rule (a weak one: every Gaussian leaning to chair more than to a negative)
    assert np.array_equal(select_by_rule(_model(TABLE, vocabulary=()), "chair", SelectionRule()).numpy(),
                          [True, True, True, True, False, False, True])


@pytest.mark.parametrize("mode", ["wins", "absolute"])
def test_chunked_selection_equals_unchunked(mode):
    """select_by_rule / gaussian_relevancy / predict_classes read the features block by block (feature_chunks, issue
    27): any block size gives the whole table's answer, also through a model's own gaussian_feature_chunks."""
    from qrender_ns.eval.scannet3d import predict_classes
    from qrender_ns.features.selection import feature_chunks, gaussian_relevancy

    gen = torch.Generator().manual_seed(0)
    rows = [_axis(*((w, float(x)) for w, x in zip(WORDS, torch.rand(7, generator=gen)))) for _ in range(37)]
    rows[5] = torch.zeros(8)
    model = _model(rows)
    full = torch.stack(rows)
    rule = SelectionRule(mode, 0.5)
    whole = select_by_rule(model, "chair", rule, chunk=1 << 20)
    competitors = model.text_encoder.encode(competitor_texts("chair", model.class_names, ("object", "things")))
    if mode == "wins":
        assert torch.equal(whole, wins_mask(full, model.text_encoder.encode(["chair"])[0], competitors))
    relevancy = gaussian_relevancy(model, "chair", chunk=1 << 20)
    text = model.text_encoder.encode(["wall", "floor", "chair", "table"])
    classes = predict_classes(full, text)

    def own_chunks(chunk):  # a model with its own block reader (as QSplatModel's table head)
        for start in range(0, full.shape[0], chunk):
            yield start, full[start:start + chunk]

    chunked_model = SimpleNamespace(**vars(model), gaussian_feature_chunks=own_chunks)
    for chunk in (1, 4, 10):
        for m in (model, chunked_model):
            assert torch.equal(select_by_rule(m, "chair", rule, chunk=chunk), whole)
            torch.testing.assert_close(gaussian_relevancy(m, "chair", chunk=chunk), relevancy)
            assert np.array_equal(predict_classes(feature_chunks(m, chunk), text), classes)
