"""The official OpenAI Python package against ragfleet's HTTP gateway (run by tests/http.rs).

Usage: python3 tests/openai_client.py BASE_URL API_KEY
Streams a retrieval-augmented chat completion, embeds a text, and checks that a wrong key is
refused; prints one JSON line with what it saw.
"""
import json
import sys

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)

text, chunks, extra = "", 0, None
stream = client.chat.completions.create(
    model="ragfleet",
    messages=[{"role": "user", "content": "What causes ocean tides?"}],
    max_tokens=12,
    stream=True,
    extra_body={"ragfleet": {"answer_mode": "generate"}},
)
for chunk in stream:
    chunks += 1
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    rf = (chunk.model_extra or {}).get("ragfleet")
    if rf is not None:
        extra = rf

emb = client.embeddings.create(model="ragfleet", input="the moon pulls the seas")

unauthorized = False
try:
    openai.OpenAI(base_url=base, api_key="not-the-key-0123456789", max_retries=0).models.list()
except openai.AuthenticationError:
    unauthorized = True

print(json.dumps({
    "chunks": chunks,
    "text": text,
    "sources": [s["doc_id"] for s in (extra or {}).get("sources", [])],
    "embedding_dim": len(emb.data[0].embedding),
    "unauthorized": unauthorized,
}))
