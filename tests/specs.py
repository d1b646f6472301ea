"""Spec texts shared by several test modules (the fake model's script is up to each test)."""

# A multi-hop RAG loop: a query generator called once per iteration, BM25 over corpus.jsonl,
# merged into the loop state, then an answer node reading the loop's final state.
MULTIHOP = """
name: multihop
models:
  task: {model: fake/script.yaml}
data:
  val: val.jsonl
params:
  query_instruction: {value: "Write a search query for the question."}
  answer_instruction: {value: "Answer from the passages."}
nodes:
  hops:
    kind: loop
    max_iters: 3
    state: {context: []}
    body:
      query:
        kind: llm
        system: "{{ query_instruction }}"
        user: "{{ input.question }} | known: {{ state.context }}"
      retrieve:
        kind: function
        fn: bm25
        args: {query: query}
        with: {corpus: corpus.jsonl, k: 1}
      merge:
        kind: function
        fn: dedup_extend
        args: {items: state.context, new: retrieve}
    update: {context: merge}
    until: "iteration >= 1 and len(state.context) >= 1"
  answer:
    kind: llm
    system: "{{ answer_instruction }}"
    user: "Passages: {{ hops.context }}\\nQ: {{ input.question }}"
output: answer
metric: {fn: exact_match, args: {pred: answer, target: input.answer}}
"""

CORPUS = [
    {"title": "Paris", "text": "Paris is the capital of France."},
    {"title": "Lyon", "text": "Lyon is a city in France known for food."},
    {"title": "Berlin", "text": "Berlin is the capital of Germany."},
]

# Count then parse: a trainable instruction and a fixed output-format peer.
COUNT_PIPELINE = """
params:
  instruction: {value: "Count the things.", role: task instruction}
  answer_format: {value: "End with Answer: N", role: output format, trainable: false}
nodes:
  count: {kind: llm, system: "{{ instruction }} {{ answer_format }}", user: "{{ input.question }}"}
  parse: {kind: function, fn: last_integer, args: {text: count}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""
