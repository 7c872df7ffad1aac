"""Running test bodies on several Python threads at once (the csrc calls release the GIL, so they overlap)."""
import threading


def in_threads(*fns):
    """Run each fn on its own thread, all at once; their results in order. A thread's exception is raised here."""
    results, errors = [None] * len(fns), [None] * len(fns)

    def run(i):
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        if e is not None:
            raise e
    return results
