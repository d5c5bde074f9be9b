import pytest
import torch

from metatuner.testing import tiny_model, tiny_tokenizer




@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture()
def model(tokenizer):
    return tiny_model(tokenizer, num_layers=4)
