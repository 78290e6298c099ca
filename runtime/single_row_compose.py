"""Composing the single-row early-exit graph out of a bundle's graph files (needs the `onnx` package).

Every name of graph i is prefixed, so the graphs live side by side in one model; the layer-to-layer
tensors (hidden state, attention bias) are wired by name. Layer l+1's nodes and weights go into the
`else` branch of the `If` on layer l's decision, so a row that exits never touches them.

Every layer graph derives the same small tensors from the attention bias (the exit head's pooling
mask and its row length, the attention's mask index); composed, they are computed once, by the
first layer, and the other layers read them (`SharedNodes`). The exit rule is fixed per composed
graph (a handful of operators per layer); its thresholds are inputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.utils
from onnx import TensorProto, helper, numpy_helper

from . import graphs
from .errors import PolicyError
from .graphs import GraphChain
from .single_row import EXIT_LAYER, LAYER_TEST, PATIENCE, PROBABILITIES, SATISFIED, STREAK, TAU, ExitRule

SIGNAL_OUTPUTS = {"max_probability": graphs.MAX_PROBABILITY, "confidence_score": graphs.CONFIDENCE_SCORE}
SHAREABLE_WEIGHT_ELEMENTS = 1024  # a node reading a larger weight is never shared (it is a layer's own)


def compose_single_row_graph(
    chain: GraphChain, rule: ExitRule, unrolled_layers: int | None = None
) -> onnx.ModelProto:
    """The chain as one graph that exits under `rule` (its tau and patience are the inputs exit_tau, exit_patience);
    for a rule that leaves every row at one layer, the chain cut there (no inputs but the tokens).

    `unrolled_layers`: instead, the nodes that graph runs for a row leaving after that many layers (every
    exit head and decision up to there) in one plain graph with no `If`, reporting as that row would: the
    point's work without control flow, for profiling.
    """
    if rule.test == LAYER_TEST:
        return with_probabilities(compose_truncated_graph(chain, unrolled_layers or rule.layer))
    if unrolled_layers is not None and not 1 <= unrolled_layers <= len(chain.layers):
        raise PolicyError(f"an unrolled graph runs 1 to {len(chain.layers)} layers, not {unrolled_layers}")
    embeddings = onnx.load(str(chain.embeddings.path))
    layers = [onnx.load(str(layer.path)) for layer in chain.layers[:unrolled_layers]]
    learned = graphs.CONFIDENCE_SCORE in graph_output_names(layers[0].graph)
    num_labels = layers[0].graph.output[1].type.tensor_type.shape.dim[1].dim_value
    names = output_names(learned)
    types = output_types(num_labels, learned)

    threshold_inputs = [
        helper.make_tensor_value_info(TAU, TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info(PATIENCE, TensorProto.INT64, [1]),
    ]
    main = helper.make_graph(
        [], "pcee_single_row", [*embeddings.graph.input, *threshold_inputs], value_infos(names, names, types)
    )
    shared = SharedNodes()
    shared.inline(embeddings.graph, main, "emb/", {})
    main.node.extend(start_state_nodes(num_labels))
    hidden, bias = "emb/" + graphs.HIDDEN_STATES, "emb/" + graphs.ATTENTION_BIAS
    state = ("start/counter", "start/argmax", "start/streak")
    scope, scope_outputs = main, names
    for index, layer in enumerate(layers, start=1):
        prefix = f"l{index}/"
        shared.inline(layer.graph, scope, prefix, {graphs.HIDDEN_STATES: hidden, graphs.ATTENTION_BIAS: bias})
        hidden = prefix + graphs.NEXT_HIDDEN_STATES
        exits = exit_values(prefix, learned)
        scope.node.extend(decision_nodes(rule, index, exits, state))
        state = (f"d{index}/counter", f"d{index}/argmax", f"d{index}/streak")
        result = result_values(index, exits, state[2] if rule.ensemble else "start/streak", learned)
        if index == len(layers):
            scope.node.extend(copies(result, names, scope_outputs))
            break
        if unrolled_layers is None:
            scope, scope_outputs = branch_on_exit(scope, index, result, names, scope_outputs, types)
    return model_of(main, [embeddings, *layers])


def branch_on_exit(
    scope: onnx.GraphProto, index: int, result: dict, names: list[str], outputs: list[str], types: dict
) -> tuple[onnx.GraphProto, list[str]]:
    """An `If` on layer `index`'s exit decision writing `outputs`: `then` reports `result`, `else` (returned,
    with its output names, for the next layer to go into) is empty yet."""
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
            outputs,
            name=f"if{index}",
            then_branch=then_branch,
            else_branch=else_branch,
        )
    )
    # make_node copied the branch: the next layer goes into the copy the node holds.
    return next(
        attribute.g for attribute in scope.node[-1].attribute if attribute.name == "else_branch"
    ), else_outputs


def compose_truncated_graph(chain: GraphChain, layers: int) -> onnx.ModelProto:
    """The chain cut after `layers` layers, as one graph with no control flow: embeddings, the layers and the
    last one's exit outputs (logits, ...) under their own names, the very nodes the chain runs. The model a
    user would deploy instead of early exit."""
    if not 1 <= layers <= len(chain.layers):
        raise PolicyError(f"a truncation keeps 1 to {len(chain.layers)} layers, not {layers}")
    embeddings = onnx.load(str(chain.embeddings.path))
    kept = [onnx.load(str(layer.path)) for layer in chain.layers[:layers]]
    exits = [output for output in kept[-1].graph.output if output.name != graphs.NEXT_HIDDEN_STATES]
    main = helper.make_graph([], f"pcee_truncated_{layers}", list(embeddings.graph.input), exits)
    shared = SharedNodes()
    shared.inline(embeddings.graph, main, "emb/", {})
    hidden, bias = "emb/" + graphs.HIDDEN_STATES, "emb/" + graphs.ATTENTION_BIAS
    for index, layer in enumerate(kept, start=1):
        prefix = f"l{index}/"
        shared.inline(layer.graph, main, prefix, {graphs.HIDDEN_STATES: hidden, graphs.ATTENTION_BIAS: bias})
        hidden = prefix + graphs.NEXT_HIDDEN_STATES
    main.node.extend(helper.make_node("Identity", [prefix + output.name], [output.name]) for output in exits)
    # Only what the outputs need: the exit heads of the layers before the last are dropped.
    return onnx.utils.Extractor(model_of(main, [embeddings, *kept])).extract_model(
        [graph_input.name for graph_input in main.input], [output.name for output in exits]
    )


class SharedNodes:
    """Inlines graphs; a node that computes from the attention bias and small constants alone, the same
    way as a node inlined before, is dropped and its outputs read the earlier node's."""

    def __init__(self):
        self.computed: dict[tuple, list[str]] = {}  # node key -> its outputs' names in the composed graph
        self.keys: dict[
            str, tuple
        ] = {}  # composed tensor name -> what it holds, for tensors that can be shared

    def inline(
        self, source: onnx.GraphProto, target: onnx.GraphProto, prefix: str, wired: dict[str, str]
    ) -> None:
        """Copy `source`'s nodes and weights into `target`, every name prefixed; inputs named in `wired` read those tensors."""
        inputs = {graph_input.name for graph_input in source.input}
        renames: dict[str, str] = {}

        def renamed(name: str) -> str:
            if not name:
                return name
            if name in renames:
                return renames[name]
            if name in inputs:
                return wired.get(name, name)  # a token input of the embeddings graph keeps its name
            return prefix + name

        if graphs.ATTENTION_BIAS in wired:
            self.keys.setdefault(wired[graphs.ATTENTION_BIAS], ("input", graphs.ATTENTION_BIAS))
        for initializer in source.initializer:
            copy = target.initializer.add()
            copy.CopyFrom(initializer)
            copy.name = prefix + initializer.name
            if np.prod(initializer.dims) <= SHAREABLE_WEIGHT_ELEMENTS:
                self.keys[copy.name] = ("weight", tensor_digest(initializer))
        for node in source.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise ValueError(
                    f"graph node {node.name} holds a subgraph; the composer does not inline those"
                )
            node_inputs = [renamed(name) for name in node.input]
            key = self.node_key(node, node_inputs)
            if key is not None and key in self.computed:
                renames.update(zip(node.output, self.computed[key]))
                continue
            copy = target.node.add()
            copy.CopyFrom(node)
            copy.name = prefix + node.name
            copy.input[:] = node_inputs
            copy.output[:] = [renamed(name) for name in node.output]
            if key is not None:
                self.computed[key] = list(copy.output)
                for position, output in enumerate(copy.output):
                    self.keys[output] = ("output", key, position)

    def node_key(self, node: onnx.NodeProto, inputs: list[str]) -> tuple | None:
        """What the node computes, when all it reads can be shared; None otherwise."""
        if any(name and name not in self.keys for name in inputs):
            return None
        attributes = tuple(
            (attribute.name, tensor_digest(attribute.t))
            if attribute.type == onnx.AttributeProto.TENSOR  # its value, not the tensor's name
            else attribute.SerializeToString()
            for attribute in node.attribute
        )
        return (node.domain, node.op_type, attributes, tuple(self.keys.get(name) for name in inputs))


def tensor_digest(tensor: onnx.TensorProto) -> str:
    array = numpy_helper.to_array(tensor)
    return f"{array.dtype}{array.shape}" + hashlib.sha256(array.tobytes()).hexdigest()


def output_names(learned: bool) -> list[str]:
    names = [EXIT_LAYER, graphs.LOGITS, graphs.ENTROPY, graphs.MAX_PROBABILITY]
    return names + ([graphs.CONFIDENCE_SCORE] if learned else []) + [PROBABILITIES, STREAK, SATISFIED]


def value_infos(names: list[str], targets: list[str], types: dict[str, tuple]) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(target, *types[name]) for name, target in zip(names, targets)]


def output_types(num_labels: int, learned: bool) -> dict[str, tuple]:
    types = {
        EXIT_LAYER: (TensorProto.INT64, [1]),
        graphs.LOGITS: (TensorProto.FLOAT, [1, num_labels]),
        graphs.ENTROPY: (TensorProto.FLOAT, [1]),
        graphs.MAX_PROBABILITY: (TensorProto.FLOAT, [1]),
        PROBABILITIES: (TensorProto.FLOAT, [1, num_labels]),
        STREAK: (TensorProto.FLOAT, [1, num_labels]),
        SATISFIED: (TensorProto.BOOL, [1]),
    }
    if learned:
        types[graphs.CONFIDENCE_SCORE] = (TensorProto.FLOAT, [1])
    return types


def graph_output_names(graph: onnx.GraphProto) -> list[str]:
    return [output.name for output in graph.output]


def exit_values(prefix: str, learned: bool) -> dict[str, str]:
    names = [graphs.LOGITS, graphs.ENTROPY, graphs.MAX_PROBABILITY]
    return {name: prefix + name for name in names + ([graphs.CONFIDENCE_SCORE] if learned else [])}


def start_state_nodes(num_labels: int) -> list[onnx.NodeProto]:
    """Before layer 1: no confident layer yet, no previous argmax (-1: never equal), an empty streak."""
    return [
        constant("start/counter", TensorProto.INT64, [1], [0]),
        constant("start/argmax", TensorProto.INT64, [1], [-1]),
        constant("start/streak", TensorProto.FLOAT, [1, num_labels], [0.0] * num_labels),
        constant("start/one", TensorProto.INT64, [1], [1]),
        constant("start/no_streak", TensorProto.FLOAT, [1], [0.0]),
    ]


def constant(name: str, dtype: int, shape: list[int], values: list) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=name, value=helper.make_tensor(name + "/value", dtype, shape, values)
    )


def decision_nodes(
    rule: ExitRule, layer: int, exits: dict[str, str], state: tuple[str, str, str]
) -> list[onnx.NodeProto]:
    """After `layer`: is it confident under `rule`, the counter of confident layers in a row, exit or not."""
    counter, argmax, streak = state
    p = f"d{layer}/"
    nodes = confident_nodes(rule.test, p, exits, argmax)
    nodes += [
        helper.make_node("Add", [counter, "start/one"], [p + "counter_plus_one"]),
        helper.make_node(
            "Where", [p + "confident", p + "counter_plus_one", "start/counter"], [p + "counter"]
        ),
        helper.make_node("GreaterOrEqual", [p + "counter", PATIENCE], [p + "exit"]),
    ]
    if rule.ensemble:  # the streak's summed probabilities, averaged at the exit
        nodes += [
            helper.make_node("Softmax", [exits[graphs.LOGITS]], [p + "probabilities"], axis=-1),
            helper.make_node("Add", [streak, p + "probabilities"], [p + "streak_sum"]),
            helper.make_node("Where", [p + "confident", p + "streak_sum", "start/no_streak"], [p + "streak"]),
        ]
    return nodes


def confident_nodes(test: str, p: str, exits: dict[str, str], previous_argmax: str) -> list[onnx.NodeProto]:
    if test == "entropy":
        return [helper.make_node("Less", [exits[graphs.ENTROPY], TAU], [p + "confident"])]
    if test in SIGNAL_OUTPUTS:
        return [helper.make_node("Greater", [exits[SIGNAL_OUTPUTS[test]], TAU], [p + "confident"])]
    return [  # pabee: the same argmax as the layer before
        helper.make_node("ArgMax", [exits[graphs.LOGITS]], [p + "argmax"], axis=-1, keepdims=0),
        helper.make_node("Equal", [p + "argmax", previous_argmax], [p + "confident"]),
    ]


def result_values(layer: int, exits: dict[str, str], streak: str, learned: bool) -> dict[str, str | int]:
    """The tensors a row that leaves after `layer` reports, by output name (exit_layer is a number)."""
    values: dict[str, str | int | SoftmaxOf] = {name: exits[name] for name in exits}
    values.update(
        {
            PROBABILITIES: SoftmaxOf(exits[graphs.LOGITS]),
            STREAK: streak,
            SATISFIED: f"d{layer}/exit",
            EXIT_LAYER: layer,
        }
    )
    return values


@dataclass(frozen=True)
class SoftmaxOf:
    """A result computed where the row exits, not before: the softmax of the tensor `logits`."""

    logits: str


def copies(result: dict, names: list[str], targets: list[str]) -> list[onnx.NodeProto]:
    """Nodes that write `result`'s tensors (its exit layer number, its softmax) under the names `targets`."""
    nodes = []
    for name, target in zip(names, targets):
        source = result[name]
        if isinstance(source, int):
            nodes.append(constant(target, TensorProto.INT64, [1], [source]))
        elif isinstance(source, SoftmaxOf):
            nodes.append(helper.make_node("Softmax", [source.logits], [target], axis=-1))
        else:
            nodes.append(helper.make_node("Identity", [source], [target]))
    return nodes


def with_probabilities(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with one more output: the softmax of its logits, as a single row reports its probabilities."""
    model.graph.node.append(helper.make_node("Softmax", [graphs.LOGITS], [PROBABILITIES], axis=-1))
    model.graph.output.append(helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, None))
    return model


def model_of(graph: onnx.GraphProto, sources: list[onnx.ModelProto]) -> onnx.ModelProto:
    """A model around `graph`, built from the `sources` graphs: every opset any of them imports, at its highest."""
    versions: dict[str, int] = {}
    for source in sources:
        for opset in source.opset_import:
            versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in versions.items()])
    model.ir_version = max(source.ir_version for source in sources)
    return model
