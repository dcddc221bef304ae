"""Rules over the package source: no pickle loads, no implicit remote code, safetensors only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlmcredit"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.AST) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    if isinstance(func, ast.Name):
        return func.id
    return "?"


def test_no_pickle_and_no_implicit_remote_code() -> None:
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names]
                module = getattr(node, "module", None) or ""
                if "pickle" in names or module in ("pickle", "dill", "joblib"):
                    problems.append(f"{path}:{node.lineno}: imports pickle")
        for call in _calls(tree):
            name = _name(call.func)
            keywords = {k.arg: k.value for k in call.keywords}
            if name.endswith("torch.load") or (name == "load" and "weights_only" in keywords):
                wo = keywords.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{path}:{call.lineno}: torch.load without weights_only=True")
            trc = keywords.get("trust_remote_code")
            if isinstance(trc, ast.Constant) and trc.value is True:
                problems.append(f"{path}:{call.lineno}: trust_remote_code=True")
            st = keywords.get("use_safetensors")
            if isinstance(st, ast.Constant) and st.value is False:
                problems.append(f"{path}:{call.lineno}: use_safetensors=False")
    assert not problems, "\n".join(problems)


def test_model_loading_asks_for_safetensors_and_passes_the_users_flag() -> None:
    source = (PACKAGE / "models" / "loading.py").read_text()
    tree = ast.parse(source)
    loads = [c for c in _calls(tree) if _name(c.func).endswith("from_pretrained")]
    assert loads, "no from_pretrained call found"
    model_loads = [c for c in loads if "use_safetensors" in {k.arg for k in c.keywords}]
    assert model_loads
    for call in model_loads:
        keywords = {k.arg: k.value for k in call.keywords}
        assert isinstance(keywords["use_safetensors"], ast.Constant)
        assert keywords["use_safetensors"].value is True
        assert isinstance(keywords["trust_remote_code"], ast.Name)  # the user's flag, passed on
