"""The approvals console in a real headless Chromium: sign in, see the
pending requests, have a forged form refused, approve one and deny one;
then sign out, and sign in again through the OIDC provider as OIDC_EMAIL.

usage: console_check.py BASE_URL TOKEN APPROVE_ID DENY_ID OIDC_EMAIL
"""
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base, token, approve_id, deny_id, oidc_email = sys.argv[1:6]

options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
    options.add_argument(arg)
# The console's certificate is signed by the daemon's own CA; the CLI tests
# verify it, the browser here tests the console.
options.accept_insecure_certs = True
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
driver.implicitly_wait(5)


def state_becomes(want):
    """Waits for the request page after a form post to show `want` (the old
    page's elements go stale while the browser follows the redirect)."""
    WebDriverWait(
        driver, 10, ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)
    ).until(lambda d: d.find_element(By.ID, "state").text == want)

try:
    # Not signed in: sent to the login form.
    driver.get(base + "/approvals")
    assert driver.current_url.endswith("/login"), driver.current_url
    driver.find_element(By.ID, "token").send_keys("ia_wrong")
    driver.find_element(By.ID, "signin").click()
    WebDriverWait(driver, 10).until(lambda d: "Unknown token" in d.page_source)
    driver.get(base + "/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "signin").click()
    WebDriverWait(driver, 10).until(lambda d: d.current_url.endswith("/approvals"))
    assert "signed in as alice" in driver.page_source

    ids = [r.get_attribute("data-id") for r in driver.find_elements(By.CSS_SELECTOR, "tr.request")]
    assert approve_id in ids and deny_id in ids, ids

    # A form posted from elsewhere, with the login cookie but without the
    # page's CSRF token, is refused.
    cookie = driver.get_cookie("interceptor_console")
    assert cookie and cookie.get("httpOnly"), cookie
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    forged = urllib.request.Request(
        f"{base}/approvals/{approve_id}/decide",
        data=urllib.parse.urlencode({"csrf": "forged", "action": "approve", "reason": "x"}).encode(),
        headers={"Cookie": f"interceptor_console={cookie['value']}"},
    )
    try:
        urllib.request.urlopen(forged, context=ctx)
        sys.exit("a forged decision was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 403, e.code

    driver.get(f"{base}/approvals/{approve_id}")
    assert driver.find_element(By.ID, "state").text == "pending"
    statement = driver.find_element(By.ID, "statement")
    assert "UPDATE approval_t SET v = 7000" in statement.text, statement.text
    keywords = [k.text for k in statement.find_elements(By.CSS_SELECTOR, "span.k")]
    assert "UPDATE" in keywords and "WHERE" in keywords, keywords
    page = driver.page_source
    assert "interceptor:user=agent" in page and "estimate" in page, page
    driver.find_element(By.ID, "reason").send_keys("checked in the console")
    driver.find_element(By.ID, "approve").click()
    state_becomes("approved")

    driver.get(f"{base}/approvals/{deny_id}")
    driver.find_element(By.ID, "reason").send_keys("wrong row")
    driver.find_element(By.ID, "deny").click()
    state_becomes("denied")

    driver.get(base + "/approvals")
    assert driver.find_elements(By.ID, "none"), "nothing should be pending now"

    # Sign out, then in through the provider: its form, then back to the
    # console, which moves on to the requests by itself.
    driver.find_element(By.ID, "signout").click()
    WebDriverWait(driver, 10).until(lambda d: d.current_url.endswith("/login"))
    driver.get(base + "/approvals")
    assert driver.current_url.endswith("/login"), "signed out, yet " + driver.current_url
    driver.find_element(By.ID, "oidc").click()
    WebDriverWait(driver, 10).until(lambda d: "/authorize" in d.current_url)
    driver.find_element(By.ID, "email").send_keys(oidc_email)
    driver.find_element(By.ID, "idp-signin").click()
    WebDriverWait(driver, 10).until(lambda d: d.current_url.endswith("/approvals"))
    assert "signed in as dana" in driver.page_source, driver.page_source
    print("console OK")
finally:
    driver.quit()
