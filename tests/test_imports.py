"""Start-up cost: the package, the CLI and the commands that build no model must not import torch.

Each check runs in a fresh interpreter, since this test process may already have torch loaded.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_package_and_cli_start_without_torch():
    proc = _run("""
        import sys

        import embedstore, embedstore.cli, embedstore.cli.app
        # the modules `probe`, `match`, `report` and `ls` load when they run, and a match config
        # without a projection head (which validates the head's parameter names)
        import embedstore.probe, embedstore.heads, embedstore.match.run, embedstore.match.query, embedstore.report
        from embedstore.match.config import MatchConfig
        MatchConfig.from_dict({"store": "s.zarr", "features": "f", "groups": "g", "head": {"hidden_dim": 64}})
        dir(embedstore)

        try:
            sys.argv = ["embedstore", "--help"]
            embedstore.cli.main()
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        loaded = sorted(m for m in ("torch", "torchvision", "timm", "open_clip", "safetensors.torch") if m in sys.modules)
        assert not loaded, f"imported at start-up: {loaded}"
    """)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout


def test_lazy_public_names_are_the_functions():
    proc = _run("""
        import sys

        import embedstore
        assert "torch" not in sys.modules
        assert {"extract", "create_encoder", "list_encoders", "register_encoder"} <= set(dir(embedstore))
        from embedstore import create_encoder, extract, list_encoders, register_encoder
        import embedstore.extraction
        from embedstore.extraction import extract as engine_extract
        assert extract is engine_extract and embedstore.extract is engine_extract, embedstore.extract
        assert create_encoder is embedstore.create_encoder and callable(list_encoders) and callable(register_encoder)
        assert "mobilenet_v2" in {e["name"] for e in list_encoders()}
        try:
            embedstore.no_such_name
        except AttributeError:
            pass
        else:
            raise AssertionError("unknown attribute did not raise AttributeError")
    """)
    assert proc.returncode == 0, proc.stderr


def test_extract_is_the_function_and_extraction_the_module():
    from embedstore import extract
    import embedstore
    import embedstore.extraction

    assert callable(extract) and not isinstance(extract, types.ModuleType)
    assert isinstance(embedstore.extraction, types.ModuleType)
    assert embedstore.extract is extract is embedstore.extraction.extract


def test_a_probe_config_on_a_machine_without_a_gpu_driver_does_not_import_torch():
    """``device: auto`` (the probe's default) means the CPU where no GPU driver is loaded, known without torch."""
    proc = _run("""
        import sys

        from embedstore.devices import _gpu_driver_possible, device_name
        from embedstore.heads import LogRegHead
        from embedstore.probe import ProbeConfig

        ProbeConfig.from_dict({"store": "s.zarr", "features": ["f"], "target": "dx"})
        assert LogRegHead(device="auto").fit_device() == ("cpu" if not _gpu_driver_possible() else device_name("auto"))
        if not _gpu_driver_possible():
            assert "torch" not in sys.modules, "torch imported to resolve device auto"
    """)
    assert proc.returncode == 0, proc.stderr
