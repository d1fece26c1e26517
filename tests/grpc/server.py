"""A gRPC test server (grpcio, raw-bytes methods: no generated code): unary, server streaming,
client streaming and bidirectional streaming, plus a failing and a slow method. Prints its port."""
import sys
import time
from concurrent import futures

import grpc


def unary(request, context):
    if request == b"fail":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request == b"slow":
        time.sleep(3)
    metadata = dict(context.invocation_metadata())
    caller = metadata.get("x-forwarded-client-cert", "")
    return b"echo:" + request + b" from " + sys.argv[1].encode() + (b" xfcc=" + caller.encode() if caller else b"")


def server_stream(request, context):
    for i in range(int(request)):
        yield b"%d" % i


def client_stream(requests, context):
    return b"+".join(requests)


def bidi(requests, context):
    for message in requests:
        yield b"got:" + message


handler = grpc.method_handlers_generic_handler(
    "keel.Test",
    {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    },
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination(timeout=120)
