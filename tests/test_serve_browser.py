"""The server's web page in a real browser: Selenium drives Debian's headless chromium (`apt-get install chromium
chromium-driver`; .ci/run installs them) against `python -m resnet_flax.serve` on a free loopback port.

A photo is uploaded through the page's file input (a real CIFAR-10 test JPEG when ../shared/data has them, else a
generated one), and the top-5 the page shows must be the API's answer for the same file; Grad-CAM is asked for and
shown; a screenshot is saved under the test's tmp dir. A server with a key (from RESNET_FLAX_API_KEY) makes the page
ask for it: a wrong key is refused, the right one works, and nothing of it is stored.
"""

import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from helpers import free_port, start_server, wait_until_ready

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path('/usr/bin/chromium'), Path('/usr/bin/chromedriver')
KEY = 'browser-test-key-51c2'
WAIT_S = 60


@pytest.fixture(scope='module')
def browser():
  if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
  options = webdriver.ChromeOptions()
  options.binary_location = str(CHROMIUM)
  for argument in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1100,900'):
    options.add_argument(argument)
  driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
  yield driver
  driver.quit()


@pytest.fixture(scope='module')
def photo(request, tmp_path_factory) -> Path:
  """The first CIFAR-10 test JPEG of the cat class, or a generated 480x360 JPEG where the real images are absent."""
  try:
    return sorted((request.getfixturevalue('cifar10_jpeg_dir') / 'test' / 'cat').glob('*.jpg'))[0]
  except pytest.skip.Exception:
    path = tmp_path_factory.mktemp('photo') / 'generated.jpg'
    gradient = np.linspace(0, 255, 480, dtype=np.float32)[None, :, None] * np.ones((360, 1, 3), np.float32)
    noise = np.random.default_rng(0).normal(0, 20, (360, 480, 3))
    Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def serve(workdir, env: dict[str, str] | None = None):
  """(base URL, process) of `python -m resnet_flax.serve` of `workdir` with ONNX Runtime, once ready."""
  port = free_port()
  process = start_server(workdir, port, '--backend=onnx', env=env)
  url = f'http://127.0.0.1:{port}'
  wait_until_ready(url, process)
  return url, process


@pytest.fixture(scope='module')
def server(exported):
  url, process = serve(exported[0])
  yield url
  process.terminate()
  process.communicate(timeout=60)


@pytest.fixture(scope='module')
def server_with_key(exported):
  url, process = serve(exported[0], env={'RESNET_FLAX_API_KEY': KEY})
  yield url
  process.terminate()
  process.communicate(timeout=60)


def wait(driver, condition, message: str):
  return WebDriverWait(driver, WAIT_S).until(lambda _: condition(), message)


def text(driver, element_id: str) -> str:
  return driver.find_element(By.ID, element_id).get_attribute('textContent')


def shown_top5(driver) -> list[tuple[str, str, str, str]]:
  """(class, probability, the label's text, the value's text) of each bar of the newest result."""
  items = wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, '.result .top5 li') or None, 'no top-5 shown')
  return [
    (
      item.get_attribute('data-class'),
      item.get_attribute('data-probability'),
      item.find_element(By.CLASS_NAME, 'label').text,
      item.find_element(By.CLASS_NAME, 'value').text,
    )
    for item in items
  ]


def api_top5(url: str, photo: Path, headers: dict[str, str] | None = None) -> list[dict]:
  files = [('file', (photo.name, photo.read_bytes(), 'image/jpeg'))]
  response = httpx.post(f'{url}/v1/predict', params={'top_k': 5}, files=files, headers=headers)
  assert response.status_code == 200, response.text
  return response.json()['predictions'][0]['top_k']


def test_the_page_shows_the_apis_top5_and_grad_cam(browser, server, exported, photo, tmp_path):
  model = exported[2]
  browser.get(server)
  wait(browser, lambda: text(browser, 'model-step') if browser.find_elements(By.ID, 'model-step') else None, 'no model')
  assert (text(browser, 'model-name'), text(browser, 'model-step')) == ('resnet_tiny', str(model.step))
  assert text(browser, 'class-count') == '10' and text(browser, 'model-backend') == 'onnx'
  classes = [item.get_attribute('textContent') for item in browser.find_elements(By.CSS_SELECTOR, '#classes li')]
  assert classes == list(model.class_names)

  browser.find_element(By.ID, 'file-input').send_keys(str(photo))
  expected = api_top5(server, photo)
  assert [row[:2] for row in shown_top5(browser)] == [(e['class'], str(e['probability'])) for e in expected]
  assert [row[2:] for row in shown_top5(browser)] == [(e['class'], f'{100 * e["probability"]:.1f}%') for e in expected]
  result = browser.find_element(By.CLASS_NAME, 'result')
  assert result.find_element(By.CLASS_NAME, 'file-name').text == photo.name
  preview = result.find_element(By.CLASS_NAME, 'preview')
  assert wait(browser, lambda: browser.execute_script('return arguments[0].naturalWidth', preview), 'no preview') > 0

  result.find_element(By.CLASS_NAME, 'explain-button').click()
  overlay = result.find_element(By.CLASS_NAME, 'overlay')
  wait(browser, lambda: overlay.is_displayed() and browser.execute_script('return arguments[0].complete', overlay), '')
  assert browser.execute_script('return [arguments[0].naturalWidth, arguments[0].naturalHeight]', overlay) == [256, 256]
  screenshot = tmp_path / 'page.png'
  assert browser.save_screenshot(str(screenshot))
  assert Image.open(io.BytesIO(screenshot.read_bytes())).size[0] > 0


def test_a_server_with_a_key_makes_the_page_ask_for_it_once_and_store_nothing(
  browser, server_with_key, exported, photo, tmp_path
):
  browser.get(server_with_key)
  form = browser.find_element(By.ID, 'key-form')
  wait(browser, form.is_displayed, 'the page did not ask for the key')
  assert text(browser, 'model-info') == 'Waiting for the API key.'
  browser.find_element(By.ID, 'key-input').send_keys('not-the-key')
  browser.find_element(By.ID, 'key-submit').click()
  wait(browser, lambda: text(browser, 'key-error') == 'That key was refused.', 'a wrong key was not refused')

  browser.find_element(By.ID, 'key-input').send_keys(KEY)
  browser.find_element(By.ID, 'key-submit').click()
  wait(browser, lambda: browser.find_elements(By.ID, 'model-step'), 'the right key was not taken')
  assert not form.is_displayed() and text(browser, 'model-step') == str(exported[2].step)
  browser.find_element(By.ID, 'file-input').send_keys(str(photo))
  expected = api_top5(server_with_key, photo, headers={'Authorization': f'Bearer {KEY}'})
  assert [row[0] for row in shown_top5(browser)] == [e['class'] for e in expected]
  stored = browser.execute_script('return [localStorage.length, sessionStorage.length, document.cookie]')
  assert stored == [0, 0, ''] and KEY not in browser.page_source
  assert browser.save_screenshot(str(tmp_path / 'page_with_key.png'))
  assert os.path.getsize(tmp_path / 'page_with_key.png') > 0
