import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

from fixtures import FIXTURES, SHARED, load_fixture  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run slow and GPU tests")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_data = pytest.mark.skip(reason=f"needs {SHARED}")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "data" in item.keywords and not SHARED.is_dir():
            item.add_marker(skip_data)


@pytest.fixture(scope="session")
def shipped_model():
    import cellmask

    return cellmask.load_model(device="cpu")


@pytest.fixture(scope="session")
def tiny_config():
    from cellmask.config import ModelConfig

    return ModelConfig(stage_widths=(8, 16, 16), stage_blocks=(1, 1, 1), fpn_channels=16,
                       box_head_width=32, mask_head_layers=(16,), box_batch_per_image=32,
                       rpn_pre_nms_train=200, rpn_post_nms_train=100)


@pytest.fixture
def dataset_dir(tmp_path):
    """A training-data folder (images/, masks/, splits/) made of the real fixtures."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "splits").mkdir()
    for name in FIXTURES:
        image, masks = load_fixture(name)
        tifffile.imwrite(tmp_path / "images" / f"{name}.tif", image)
        tifffile.imwrite(tmp_path / "masks" / f"{name}.tif", masks)
    (tmp_path / "splits" / "train.txt").write_text("\n".join(FIXTURES) + "\n")
    (tmp_path / "splits" / "val.txt").write_text(FIXTURES[0] + "\n")
    return tmp_path
