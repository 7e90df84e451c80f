"""How the test suite itself runs for a contributor (tests/conftest.py).

`pytest -n 2` says what its workers do before the first result, and Ctrl-C
(SIGINT to the terminal's whole process group) ends it at once, with exit
status 2 (interrupted), no traceback, and no process left behind.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# Workers as the suite's: JAX loaded, a computation compiled, and a thread
# that would hold up the interpreter's exit (as a library's writer thread).
SLOW_TESTS = '''
import threading
import time
import jax

def test_sleeps_a():
  jax.jit(lambda x: x + 1)(1.0)
  time.sleep(60)

def test_sleeps_b():
  jax.jit(lambda x: x * 2)(1.0)
  threading.Thread(target=time.sleep, args=(60,), daemon=False).start()
  time.sleep(60)
'''


# Starts a program with SIGINT handled as in a terminal (a background job
# that started this test may have it ignored, which children inherit).
WITH_SIGINT = ('import os, signal, sys; '
               'signal.signal(signal.SIGINT, signal.SIG_DFL); '
               'os.execv(sys.executable, [sys.executable] + sys.argv[1:])')


def test_ctrl_c_ends_a_parallel_run_at_once(tmp_path):
  shutil.copy(os.path.join(HERE, 'conftest.py'), tmp_path)
  (tmp_path / 'test_sleeps.py').write_text(SLOW_TESTS)
  output = tmp_path / 'output.txt'
  # A run of its own, even when this test runs in a worker of another.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('PYTEST_XDIST', 'PYTEST_CURRENT'))}
  with open(output, 'wb') as out:
    run = subprocess.Popen(  # Its own process group, as a terminal job.
        [sys.executable, '-c', WITH_SIGINT, '-m', 'pytest', '-q', '-n', '2',
         '-p', 'no:cacheprovider', str(tmp_path)], cwd=tmp_path, env=env,
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
      deadline = time.time() + 120
      while output.read_text().count('tests collected') < 2:
        assert time.time() < deadline and run.poll() is None, (
            output.read_text())
        time.sleep(0.2)
      time.sleep(3)  # Both workers are inside a test.
      os.killpg(run.pid, signal.SIGINT)
      start = time.time()
      returncode = run.wait(timeout=30)
      seconds = time.time() - start
    finally:
      if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
  text = output.read_text()
  assert text.startswith('bringing up nodes...\nStarting 2 workers: each '
                         'imports JAX'), text
  assert returncode == 2, text
  assert seconds < 5, (seconds, text)
  assert 'Traceback' not in text and 'KeyboardInterrupt' in text, text
  time.sleep(1)
  left = subprocess.run(['pgrep', '-g', str(run.pid)], capture_output=True,
                        text=True).stdout.split()
  assert not left, left
