"""The serving wing: `skipdecode serve` and its Ray Serve scale-out.

    config.py         ServeConfig: every option once; the command-line flags and a Ray config file's args derive
                      from it
    build.py          build_server(config): engine, continuous-batching service and app; `skipdecode serve` runs it
    app.py            the ASGI app (starlette): routes, access guard, metrics, one error path
    protocol.py       the OpenAI completions protocol without a web framework: request parsing, response bodies
    net.py            Host names, the exposure warning, connection limits on uvicorn
    engine_source.py  an engine directory or archive URI -> a verified local engine directory
    ray.py            the same server on Ray Serve replicas (imports Ray: the only module that does)

Importing this package loads nothing: each module imports what it needs.
"""
