// Builds dashboard/static/plotly-routescope.min.js: plotly.js's core with only the trace types
// listed in dashboard/plotly_bundle.json, the way plotly.js documents a custom bundle
// (CUSTOM_BUNDLE.md, lib/core + Plotly.register) and with its own esbuild settings
// (esbuild-config.js). Run by scripts/build_plotly_bundle.sh; the output is deterministic.
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const esbuild = require('esbuild');
const { environmentPlugin } = require('esbuild-plugin-environment');
const InlineCSSPlugin = require('esbuild-plugin-inline-css');

const dashboard = path.resolve(__dirname, '..', '..', 'dashboard');
const metaPath = path.join(dashboard, 'plotly_bundle.json');
const meta = JSON.parse(fs.readFileSync(metaPath, 'utf8'));
const installed = require('plotly.js/package.json').version;
if (installed !== meta['plotly.js']) {
    throw new Error(`plotly_bundle.json asks for plotly.js ${meta['plotly.js']}, package.json installs ${installed}`);
}
const entry = [
    "'use strict';",
    "var Plotly = require('plotly.js/lib/core');",
    'Plotly.register([' + meta.traces.filter(t => t !== 'scatter').map(t => `require('plotly.js/lib/${t}')`).join(', ') + ']);',
    'module.exports = Plotly;',
].join('\n');
const banner = [
    '/**',
    `* plotly.js v${installed}, partial bundle for routescope's dashboard: ${meta.traces.join(', ')}`,
    '* Copyright 2012-2026, Plotly, Inc.',
    '* All rights reserved.',
    '* Licensed under the MIT license',
    '* Built by scripts/plotly_bundle/build.js; the bundled dependencies\' notices are at the end.',
    '*/',
].join('\n');

const outfile = path.join(dashboard, meta.file);
esbuild.build({
    stdin: { contents: entry, resolveDir: __dirname, sourcefile: 'routescope-plotly.js' },
    outfile,
    format: 'iife',
    globalName: 'Plotly',
    bundle: true,
    minify: true,
    sourcemap: false,
    legalComments: 'eof',
    banner: { js: banner },
    plugins: [InlineCSSPlugin(), environmentPlugin({ NODE_DEBUG: false })],
    alias: { regl: '@plotly/regl', stream: 'stream-browserify' },
    define: { global: 'window', 'define.amd': 'false' },
    target: 'es2016',
    logLevel: 'info',
}).then(() => {
    const digest = crypto.createHash('sha256').update(fs.readFileSync(outfile)).digest('hex');
    meta.sha256 = digest;
    fs.writeFileSync(metaPath, JSON.stringify(meta, null, 2) + '\n');
    console.log(`${path.relative(process.cwd(), outfile)} sha256 ${digest}`);
}).catch(() => process.exit(1));
