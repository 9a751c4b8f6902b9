import pytest

from qt.training.config import ConfigError
from qt.training.image_data import load_image_datasets


@pytest.mark.parametrize("dataset, message", [
    ("./no/such/images", "--dataset ./no/such/images: no such folder"),
    ("no_such/images", "--dataset no_such/images: there is no such local path"),  # OWNER/NAME: a hub name too
])
def test_a_missing_image_folder_is_named_as_missing(dataset, message, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as on a machine without internet
    with pytest.raises(ConfigError) as error:
        load_image_datasets(dataset, val_fraction=0.1, seed=0)
    assert message in str(error.value)
