"""gRPC calls through Keel (argv: Keel's port, the authority to send): every kind of call, a
deadline, a status code; prints one line per check and exits non-zero on the first failure."""
import queue
import sys

import grpc

port, authority = sys.argv[1], sys.argv[2]
channel = grpc.insecure_channel(
    "127.0.0.1:" + port, options=[("grpc.default_authority", authority)]
)


def check(name, ok, detail=""):
    print(("ok " if ok else "FAIL ") + name + " " + str(detail), flush=True)
    if not ok:
        sys.exit(1)


unary = channel.unary_unary("/keel.Test/Unary")
reply = unary(b"hi", timeout=10)
check("unary", reply.startswith(b"echo:hi from "), reply)

try:
    unary(b"fail", timeout=10)
    check("status", False, "no error")
except grpc.RpcError as e:
    check("status", e.code() == grpc.StatusCode.NOT_FOUND and e.details() == "no such thing", e)

try:
    unary(b"slow", timeout=0.5)
    check("deadline", False, "no error")
except grpc.RpcError as e:
    check("deadline", e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.code())

replies = list(channel.unary_stream("/keel.Test/ServerStream")(b"50", timeout=10))
check("server streaming", replies == [b"%d" % i for i in range(50)], len(replies))

reply = channel.stream_unary("/keel.Test/ClientStream")(iter([b"a", b"b" * 100000, b"c"]), timeout=10)
check("client streaming", reply == b"a+" + b"b" * 100000 + b"+c", len(reply))

# Bidirectional ping-pong: each message is sent only after the answer to the previous one came
# back, which works only if requests and responses flow at the same time.
outgoing = queue.Queue()


def requests():
    while True:
        message = outgoing.get()
        if message is None:
            return
        yield message


responses = channel.stream_stream("/keel.Test/Bidi")(requests(), timeout=10)
ok = True
for i in range(20):
    outgoing.put(b"m%d" % i)
    answer = next(responses)
    ok = ok and answer == b"got:m%d" % i
outgoing.put(None)
rest = list(responses)
check("bidi ping-pong", ok and rest == [], rest)

# Many short calls at once, on few connections.
futures = [unary.future(b"n%d" % i, timeout=10) for i in range(300)]
check("300 concurrent unary", all(f.result().startswith(b"echo:n") for f in futures))
