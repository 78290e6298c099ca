"""Composing the single-row early-exit graph out of a bundle's graph files (needs the `onnx` package).

Every name of graph i is prefixed, so the graphs live side by side in one model; the layer-to-layer
tensors (hidden state, attention bias) are wired by name. Layer l+1's nodes and weights go into the
`else` branch of the `If` on layer l's decision, so a row that exits never touches them.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from . import graphs
from .graphs import GraphChain
from .single_row import EXIT_LAYER, PATIENCE, SATISFIED, SIGNAL, STREAK, TAU

SIGNALS_COUNT = 5


def compose_single_row_graph(chain: GraphChain) -> onnx.ModelProto:
    embeddings = onnx.load(str(chain.embeddings.path))
    layers = [onnx.load(str(layer.path)) for layer in chain.layers]
    learned = graphs.CONFIDENCE_SCORE in graph_output_names(layers[0].graph)
    num_labels = layers[0].graph.output[1].type.tensor_type.shape.dim[1].dim_value
    names = output_names(learned)
    types = output_types(num_labels, learned)

    decision_inputs = [
        helper.make_tensor_value_info(TAU, TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info(PATIENCE, TensorProto.INT64, [1]),
        helper.make_tensor_value_info(SIGNAL, TensorProto.INT64, [1]),
    ]
    main = helper.make_graph(
        [], "pcee_single_row", [*embeddings.graph.input, *decision_inputs], value_infos(names, names, types)
    )
    inline(embeddings.graph, main, "emb/", {})
    main.node.extend(start_state_nodes(num_labels))
    hidden, bias = "emb/" + graphs.HIDDEN_STATES, "emb/" + graphs.ATTENTION_BIAS
    state = ("start/counter", "start/argmax", "start/streak")
    scope, scope_outputs = main, names
    for index, layer in enumerate(layers, start=1):
        prefix = f"l{index}/"
        inline(layer.graph, scope, prefix, {graphs.HIDDEN_STATES: hidden, graphs.ATTENTION_BIAS: bias})
        hidden = prefix + graphs.NEXT_HIDDEN_STATES
        exits = exit_values(prefix, learned)
        scope.node.extend(decision_nodes(index, exits, state))
        state = (f"d{index}/counter", f"d{index}/argmax", f"d{index}/streak")
        result = result_values(index, exits, state[2], learned)
        if index == len(layers):
            scope.node.extend(copies(result, names, scope_outputs))
            break
        then_outputs = [f"then{index}/{name}" for name in names]
        else_outputs = [f"else{index}/{name}" for name in names]
        then_branch = helper.make_graph(
            copies(result, names, then_outputs),
            f"exit_after_{index}",
            [],
            value_infos(names, then_outputs, types),
        )
        else_branch = helper.make_graph(
            [], f"continue_after_{index}", [], value_infos(names, else_outputs, types)
        )
        scope.node.append(
            helper.make_node(
                "If",
                [f"d{index}/exit"],
                scope_outputs,
                name=f"if{index}",
                then_branch=then_branch,
                else_branch=else_branch,
            )
        )
        # make_node copied the branch: the next layer goes into the copy the node holds.
        scope = next(attribute.g for attribute in scope.node[-1].attribute if attribute.name == "else_branch")
        scope_outputs = else_outputs
    model = helper.make_model(main, opset_imports=merged_opsets([embeddings, *layers]))
    model.ir_version = max(graph_model.ir_version for graph_model in [embeddings, *layers])
    return model


def output_names(learned: bool) -> list[str]:
    names = [EXIT_LAYER, graphs.LOGITS, graphs.ENTROPY, graphs.MAX_PROBABILITY]
    return names + ([graphs.CONFIDENCE_SCORE] if learned else []) + [STREAK, SATISFIED]


def value_infos(names: list[str], targets: list[str], types: dict[str, tuple]) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(target, *types[name]) for name, target in zip(names, targets)]


def output_types(num_labels: int, learned: bool) -> dict[str, tuple]:
    types = {
        EXIT_LAYER: (TensorProto.INT64, [1]),
        graphs.LOGITS: (TensorProto.FLOAT, [1, num_labels]),
        graphs.ENTROPY: (TensorProto.FLOAT, [1]),
        graphs.MAX_PROBABILITY: (TensorProto.FLOAT, [1]),
        STREAK: (TensorProto.FLOAT, [1, num_labels]),
        SATISFIED: (TensorProto.BOOL, [1]),
    }
    if learned:
        types[graphs.CONFIDENCE_SCORE] = (TensorProto.FLOAT, [1])
    return types


def graph_output_names(graph: onnx.GraphProto) -> list[str]:
    return [output.name for output in graph.output]


def inline(source: onnx.GraphProto, target: onnx.GraphProto, prefix: str, wired: dict[str, str]) -> None:
    """Copy `source`'s nodes and weights into `target`, every name prefixed; its inputs named in `wired` read those tensors."""
    inputs = {graph_input.name for graph_input in source.input}

    def renamed(name: str) -> str:
        if not name:
            return name
        if name in inputs:
            return wired.get(name, name)  # a token input of the embeddings graph keeps its name
        return prefix + name

    for node in source.node:
        if any(
            attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for attribute in node.attribute
        ):
            raise ValueError(
                f"graph node {node.name} holds a subgraph; the single-row composer does not inline those"
            )
        copy = target.node.add()
        copy.CopyFrom(node)
        copy.name = prefix + node.name
        copy.input[:] = [renamed(name) for name in node.input]
        copy.output[:] = [renamed(name) for name in node.output]
    for initializer in source.initializer:
        copy = target.initializer.add()
        copy.CopyFrom(initializer)
        copy.name = prefix + initializer.name


def exit_values(prefix: str, learned: bool) -> dict[str, str]:
    names = [graphs.LOGITS, graphs.ENTROPY, graphs.MAX_PROBABILITY] + (
        [graphs.CONFIDENCE_SCORE] if learned else []
    )
    return {name: prefix + name for name in names}


def start_state_nodes(num_labels: int) -> list[onnx.NodeProto]:
    """Before layer 1: no confident layer yet, no previous argmax (-1: never equal), an empty streak."""
    return [
        constant("start/counter", TensorProto.INT64, [1], [0]),
        constant("start/argmax", TensorProto.INT64, [1], [-1]),
        constant("start/streak", TensorProto.FLOAT, [1, num_labels], [0.0] * num_labels),
    ]


def constant(name: str, dtype: int, shape: list[int], values: list) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=name, value=helper.make_tensor(name + "/value", dtype, shape, values)
    )


def decision_nodes(layer: int, exits: dict[str, str], state: tuple[str, str, str]) -> list[onnx.NodeProto]:
    """After `layer`: is it confident under the chosen signal, the counter, the argmax, the streak, exit or not."""
    counter, argmax, streak = state
    p = f"d{layer}/"
    score = exits.get(
        graphs.CONFIDENCE_SCORE, exits[graphs.ENTROPY]
    )  # no learned score: signal 2 is refused earlier
    return [
        helper.make_node("Less", [exits[graphs.ENTROPY], TAU], [p + "entropy_ok"]),
        helper.make_node("Greater", [exits[graphs.MAX_PROBABILITY], TAU], [p + "max_probability_ok"]),
        helper.make_node("Greater", [score, TAU], [p + "score_ok"]),
        helper.make_node("ArgMax", [exits[graphs.LOGITS]], [p + "argmax"], axis=-1, keepdims=0),
        helper.make_node("Equal", [p + "argmax", argmax], [p + "same_argmax"]),
        constant(p + "always", TensorProto.BOOL, [1], [True]),
        helper.make_node(
            "Concat",
            [p + "entropy_ok", p + "max_probability_ok", p + "score_ok", p + "same_argmax", p + "always"],
            [p + "tests"],
            axis=0,
        ),
        helper.make_node("Gather", [p + "tests", SIGNAL], [p + "confident"], axis=0),
        constant(p + "one", TensorProto.INT64, [1], [1]),
        helper.make_node("Add", [counter, p + "one"], [p + "counter_plus_one"]),
        constant(p + "zero", TensorProto.INT64, [1], [0]),
        helper.make_node("Where", [p + "confident", p + "counter_plus_one", p + "zero"], [p + "counter"]),
        helper.make_node("GreaterOrEqual", [p + "counter", PATIENCE], [p + "exit"]),
        helper.make_node("Softmax", [exits[graphs.LOGITS]], [p + "probabilities"], axis=-1),
        helper.make_node("Add", [streak, p + "probabilities"], [p + "streak_sum"]),
        constant(p + "no_streak", TensorProto.FLOAT, [1], [0.0]),
        helper.make_node("Where", [p + "confident", p + "streak_sum", p + "no_streak"], [p + "streak"]),
    ]


def result_values(layer: int, exits: dict[str, str], streak: str, learned: bool) -> dict[str, str]:
    """The tensors a row that leaves after `layer` reports, by output name (exit_layer is a constant)."""
    values = {graphs.LOGITS: exits[graphs.LOGITS], graphs.ENTROPY: exits[graphs.ENTROPY]}
    values[graphs.MAX_PROBABILITY] = exits[graphs.MAX_PROBABILITY]
    if learned:
        values[graphs.CONFIDENCE_SCORE] = exits[graphs.CONFIDENCE_SCORE]
    values[STREAK] = streak
    values[SATISFIED] = f"d{layer}/exit"
    values[EXIT_LAYER] = layer
    return values


def copies(result: dict, names: list[str], targets: list[str]) -> list[onnx.NodeProto]:
    """Nodes that write `result`'s tensors (or its exit layer number) under the names `targets`."""
    nodes = []
    for name, target in zip(names, targets):
        source = result[name]
        if isinstance(source, int):
            nodes.append(constant(target, TensorProto.INT64, [1], [source]))
        else:
            nodes.append(helper.make_node("Identity", [source], [target]))
    return nodes


def merged_opsets(models: list[onnx.ModelProto]) -> list[onnx.OperatorSetIdProto]:
    versions: dict[str, int] = {}
    for model in models:
        for opset in model.opset_import:
            versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    return [helper.make_opsetid(domain, version) for domain, version in versions.items()]
