// Headless-Chromium check of the pack's web extension in the real ComfyUI frontend.
// Run by tests/e2e/test_frontend.py; prints one JSON object (the findings) on its last line.
//
//   node tests/e2e/ui_check.cjs --url http://127.0.0.1:PORT --out DIR WORKFLOW.json [WORKFLOW.json ...]
//
// The first workflow is the one inspected closely (plan text, snapping, "will not fit",
// queue warning, screenshots); every workflow is loaded and checked for missing node types.
// Environment: PLAYWRIGHT_CORE_DIR (folder where playwright-core was npm-installed, or the package
// itself; default .ci/node of this checkout, where .ci/run runs `npm ci`), CHROMIUM (default
// /usr/bin/chromium).
const fs = require("fs");
const path = require("path");

function loadPlaywright() {
  const dir = process.env.PLAYWRIGHT_CORE_DIR || path.join(__dirname, "..", "..", ".ci", "node");
  const nested = path.join(dir, "node_modules", "playwright-core");
  return require(fs.existsSync(nested) ? nested : dir);
}

function parseArgs(argv) {
  const args = { workflows: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--url") args.url = argv[++i];
    else if (argv[i] === "--out") args.out = argv[++i];
    else args.workflows.push(argv[i]);
  }
  return args;
}

const SAMPLER = "StepVideoSampler";
const LOADER = "StepVideoModelLoader";
const SETTING = "StepVideo.Plan.AssumedFreeVRAM";

async function screenshot(page, dir, name, result) {
  await page.waitForTimeout(800);
  const file = path.join(dir, name);
  await page.screenshot({ path: file });
  result.screenshots.push(file);
}

// Shows the sampler and the loader at 100 % zoom, top left of the canvas.
async function closeUp(page) {
  await page.evaluate(([samplerCls, loaderCls]) => {
    const canvas = window.app.canvas;
    const sampler = window.app.graph.nodes.find((n) => n.comfyClass === samplerCls);
    const loader = window.app.graph.nodes.find((n) => n.comfyClass === loaderCls);
    canvas.ds.scale = 1.0;
    canvas.ds.offset = [90 - Math.min(loader.pos[0], sampler.pos[0]), 130 - Math.min(loader.pos[1], sampler.pos[1])];
    canvas.setDirty(true, true);
  }, [SAMPLER, LOADER]);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const { chromium } = loadPlaywright();
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"],
  });
  const result = { console: [], pageErrors: [], warnings: [], workflows: {}, screenshots: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    page.on("console", (msg) => {
      const entry = { type: msg.type(), text: msg.text(), url: msg.location()?.url ?? "" };
      if (entry.type === "error") result.console.push(entry);
      if (entry.type === "warning" && entry.text.startsWith("StepVideo")) result.warnings.push(entry.text);
    });
    page.on("pageerror", (err) => result.pageErrors.push(String(err?.stack ?? err)));
    // Queueing is checked for real up to the HTTP request, which is answered here: the server
    // would otherwise start a full-size run on the CPU.
    const queued = [];
    await page.route("**/prompt", async (route) => {
      if (route.request().method() !== "POST") return route.continue();
      queued.push(JSON.parse(route.request().postData() || "{}"));
      return route.fulfill({ status: 200, contentType: "application/json",
        body: JSON.stringify({ prompt_id: "ui-check", number: 1, node_errors: {} }) });
    });

    await page.goto(args.url, { waitUntil: "networkidle", timeout: 90000 });
    await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.stepvideoPlan,
      null, { timeout: 90000 });
    await page.keyboard.press("Escape"); // the first-run templates dialog
    await page.evaluate(async (id) => window.app.extensionManager.setting.set(id, 0), SETTING); // the server's GPU
    result.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name)
      .filter((name) => name.startsWith("StepVideo")));

    for (const file of [...args.workflows].reverse()) { // the first one ends up loaded
      const workflow = JSON.parse(fs.readFileSync(file, "utf8"));
      result.workflows[path.basename(file)] = await page.evaluate(async (wf) => {
        await window.app.loadGraphData(wf);
        const known = window.LiteGraph.registered_node_types;
        const types = [...new Set(wf.nodes.map((n) => n.type))];
        return {
          nodes: wf.nodes.length,
          loaded: window.app.graph.nodes.length,
          missing: types.filter((t) => !known[t]),
        };
      }, workflow);
    }
    await page.keyboard.press("Escape");

    const planOf = (cls) => page.evaluate((cls) => {
      const node = window.app.graph.nodes.find((n) => n.comfyClass === cls);
      return node?.widgets?.find((w) => w.name === "stepvideo_plan")?.value ?? null;
    }, cls);
    const waitPlan = (cls, pattern) => page.waitForFunction(([cls, source]) => {
      const node = window.app.graph.nodes.find((n) => n.comfyClass === cls);
      const text = node?.widgets?.find((w) => w.name === "stepvideo_plan")?.value ?? "";
      return new RegExp(source).test(text);
    }, [cls, pattern], { timeout: 30000 });
    // Change a widget the way the canvas does after a user edit (value, callback, onWidgetChanged).
    const setWidget = (cls, name, value) => page.evaluate(([cls, name, value]) => {
      const node = window.app.graph.nodes.find((n) => n.comfyClass === cls);
      const widget = node.widgets.find((w) => w.name === name);
      widget.setValue(value, { node, canvas: window.app.canvas });
      return widget.value;
    }, [cls, name, value]);

    await waitPlan(SAMPLER, "no VRAM to plan|blocks on GPU");
    result.samplerPlan = await planOf(SAMPLER);
    result.loaderPlan = await planOf(LOADER);

    result.snap = {
      width: await setWidget(SAMPLER, "width", 1000),
      frames: await setWidget(SAMPLER, "frames", 100),
    };
    await waitPlan(SAMPLER, "frames 100 → 102");
    result.snap.plan = await planOf(SAMPLER);
    await page.evaluate(async () => {
      try { await window.app.extensionManager.command.execute("Comfy.Canvas.FitView"); } catch {}
    });
    await screenshot(page, args.out, "ui_workflow.png", result);
    await closeUp(page);
    await screenshot(page, args.out, "ui_sampler_plan.png", result);
    await setWidget(SAMPLER, "width", 992);
    await setWidget(SAMPLER, "frames", 204);

    // Plan for an assumed 24 GB card: the tiny model fits easily; at the largest size with
    // every block resident it does not (13 copies of 3.9M tokens' hidden states).
    await page.evaluate(async (id) => window.app.extensionManager.setting.set(id, 24), SETTING);
    await waitPlan(SAMPLER, "24\\.0 GiB assumed");
    result.assumed24 = await planOf(SAMPLER);
    await setWidget(LOADER, "blocks_on_device", "all");
    await setWidget(SAMPLER, "width", 4096);
    await setWidget(SAMPLER, "height", 4096);
    await setWidget(SAMPLER, "frames", 1020);
    await waitPlan(SAMPLER, "WILL NOT FIT");
    result.noFit = await planOf(SAMPLER);
    result.noFitColor = await page.evaluate(() => {
      const rows = [...document.querySelectorAll(".stepvideo-plan div")];
      const row = rows.find((r) => r.textContent.includes("WILL NOT FIT"));
      return row ? getComputedStyle(row).color : null;
    });

    result.queueWrapped = await page.evaluate(() => Boolean(window.app.queuePrompt.stepvideoWrapped));
    await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
    await page.waitForTimeout(500);
    result.queued = queued.length;
    result.queuedSampler = queued[0]?.prompt
      ? Object.values(queued[0].prompt).find((n) => n.class_type === SAMPLER)?.inputs ?? null : null;
    result.toasts = await page.evaluate(() => [...document.querySelectorAll(".p-toast-message")]
      .map((t) => t.textContent.trim()));
    await closeUp(page);
    await screenshot(page, args.out, "ui_sampler_no_fit.png", result);
  } catch (err) {
    result.error = String(err?.stack ?? err);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(result));
  if (result.error) process.exitCode = 1;
}

main().catch((err) => {
  console.error(err?.stack ?? err);
  process.exit(1);
});
