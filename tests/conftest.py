import pytest

from metatuner.testing import tiny_model, tiny_tokenizer




@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture()
def model(tokenizer):
    return tiny_model(tokenizer, num_layers=4)


def _save_tiny(path, num_layers):
    from metatuner.testing import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(num_layers=num_layers)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 4-layer tiny model saved as a normal Hugging Face directory (what a user passes as model.name)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-model-4"), 4)


@pytest.fixture(scope="session")
def tiny_dir_2layers(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny-model-2"), 2)
