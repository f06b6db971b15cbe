import pytest
import torch

from kdray import KdrayError, storage
from kdray.models import MODEL_NAMES, backbone_params, build_model, count_flops, load_backbone_weights, model_cost


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shapes(name):
    model = build_model(name, 4).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_full_size_params_and_flops_match_the_paper():
    teacher, student = build_model("teacher", 3), build_model("student", 3)
    # ResNet50V2 (23.5M) + VGG19 convolutions (20.0M) ≈ 43.6M; MobileNetV2 features ≈ 2.2M
    assert backbone_params(teacher) / 1e6 == pytest.approx(43.6, abs=0.2)
    assert backbone_params(student) / 1e6 == pytest.approx(2.22, abs=0.05)
    assert teacher.feature_dim == 2048 + 512
    # MobileNetV2 at 224 px is ~0.3 GMAC = ~0.6 GFLOPs; the teacher is ~80x that
    student_gflops = count_flops(student, 224) / 1e9
    assert student_gflops == pytest.approx(0.6, rel=0.1)
    assert count_flops(teacher, 224) / 1e9 / student_gflops > 50


def test_unknown_model_and_too_few_classes():
    with pytest.raises(KdrayError, match="unknown model"):
        build_model("resnet18", 3)
    with pytest.raises(KdrayError, match="at least 2 classes"):
        build_model("student", 1)


def _backbone_file(tmp_path):
    """(source model, path of its backbone weights without the head)."""
    source = build_model("tiny_teacher", 3)
    path = tmp_path / "backbone.pt"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("head.")}, path)
    return source, path


def _assert_backbone_loaded(uri: str, source) -> None:
    model = build_model("tiny_teacher", 5, weights=uri)
    assert torch.equal(model.vgg[0].weight, source.vgg[0].weight)
    assert model.head.out_features == 5  # the head stays new


def test_backbone_weights_load_from_a_file(tmp_path):
    source, path = _backbone_file(tmp_path)
    _assert_backbone_loaded(str(path), source)


@pytest.mark.integration
def test_backbone_weights_load_from_s3(tmp_path, s3_bucket):
    source, path = _backbone_file(tmp_path)
    uri = f"s3://{s3_bucket}/weights/backbone.pt"
    storage.write_bytes(uri, path.read_bytes())
    _assert_backbone_loaded(uri, source)


def test_bad_weights_files(tmp_path):
    model = build_model("tiny_student", 3)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(KdrayError, match="not a loadable weights file"):
        load_backbone_weights(model, str(garbage))
    other = tmp_path / "other.pt"
    torch.save({"unrelated.weight": torch.zeros(3)}, other)
    with pytest.raises(KdrayError, match="share no parameter"):
        load_backbone_weights(model, str(other))
    with pytest.raises(KdrayError, match="not found"):
        load_backbone_weights(model, str(tmp_path / "missing.pt"))


def test_weights_only_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(KdrayError, match="not a loadable weights file"):
        load_backbone_weights(build_model("tiny_student", 3), str(path))


def test_model_cost_reports_params_and_gflops():
    cost = model_cost(build_model("tiny_student", 3), 32)
    assert cost.params > cost.backbone_params > 0 and cost.gflops > 0 and cost.image_size == 32
