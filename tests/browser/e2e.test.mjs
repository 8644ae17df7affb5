// Lets `node --test tests/browser/` (what scripts/test runs) find the browser tests: Node 20
// searches a directory argument only for *.test.mjs / test-*.mjs / … names, so it would skip
// e2e.mjs and report 0 tests as a pass. Run the tests directly with node --test tests/browser/e2e.mjs.
import './e2e.mjs';
