"""The house has no import circle, between modules or packages, and imports no private name across modules."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("import_graph", Path(__file__).parents[1] / "scripts" / "import_graph.py")
graph_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(graph_tool)


def test_the_checker_finds_a_circle_and_a_private_import(tmp_path) -> None:
    pkg = tmp_path / "retain"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from retain.b import g\n")  # a lazy import still counts
    (pkg / "b.py").write_text("from retain.a.x import _hidden\n")
    graph, private = graph_tool.imports(pkg)
    assert graph_tool.circles(graph) == [["retain.a.x", "retain.b"]]
    assert graph_tool.circles(graph_tool.package_graph(graph)) == [["retain.a", "retain.b"]]
    assert private == [("retain.b", "retain.a.x._hidden")]


def test_the_house_has_no_circle_and_no_private_import() -> None:
    graph, private = graph_tool.imports()
    assert len(graph) > 50  # it read the package
    assert graph_tool.circles(graph) == []
    assert graph_tool.circles(graph_tool.package_graph(graph)) == []
    assert private == []
