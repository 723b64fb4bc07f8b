package dicomfhirbeam.validator;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.ConceptValidationOptions;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.context.support.ValidationSupportContext;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.hl7.fhir.r4.model.ValueSet;

import java.util.List;
import java.util.Map;

/**
 * Codes of code systems that only a terminology server holds (SNOMED CT, LOINC) cannot be checked
 * against a ValueSet offline: R4's {@code body-site} and the German vital-sign ValueSets are SNOMED CT
 * {@code is-a} filters, which need the whole SNOMED CT hierarchy. For those codes the check is a
 * warning that says so (only where the ValueSet takes that system by filter or whole; an enumerated
 * list of codes is checked in memory), instead of the in-memory terminology's error "Failed to expand ValueSet".
 * Codes of every other system (the MII CodeSystems, HL7 v2/v3, UCUM, ...) go on to the in-memory
 * terminology and are checked for real; so does a coding whose system is not the one a ValueSet wants.
 */
final class ServerOnlyCodeSystems implements IValidationSupport {

	static final Map<String, String> SYSTEMS = Map.of(
			"http://snomed.info/sct", "SNOMED CT",
			"http://loinc.org", "LOINC");

	private final FhirContext context;

	ServerOnlyCodeSystems(FhirContext context) {
		this.context = context;
	}

	@Override
	public FhirContext getFhirContext() {
		return context;
	}

	@Override
	public String getName() {
		return "ServerOnlyCodeSystems";
	}

	@Override
	public boolean isValueSetSupported(ValidationSupportContext support, String valueSetUrl) {
		return true; // answers only for SNOMED CT and LOINC codes (null otherwise, the chain goes on)
	}

	/** True when the ValueSet takes codes of {@code system} by filter or whole (not as a list of codes). */
	private static boolean needsServer(ValueSet vs, String system) {
		for (ValueSet.ConceptSetComponent include : vs.getCompose().getInclude()) {
			if (system.equals(include.getSystem()) && (include.hasFilter() || !include.hasConcept())) {
				return true;
			}
		}
		return false;
	}

	@Override
	public CodeValidationResult validateCodeInValueSet(ValidationSupportContext support, ConceptValidationOptions options,
			String system, String code, String display, IBaseResource valueSet) {
		String name = system == null ? null : SYSTEMS.get(system);
		if (name == null) {
			return null;
		}
		if (!(valueSet instanceof ValueSet vs) || !needsServer(vs, system)) {
			return null; // an enumerated list of codes is checked in memory
		}
		String url = vs.getUrl();
		String message = name + " code '" + code + "' was not checked against ValueSet " + url
				+ ": that needs a terminology server (offline validation)";
		return new CodeValidationResult()
				.setCode(code)
				.setDisplay(display)
				.setSeverity(IssueSeverity.WARNING)
				.setMessage(message)
				.setIssues(List.of(new CodeValidationIssue(message, IssueSeverity.WARNING,
						CodeValidationIssueCode.NOT_FOUND, CodeValidationIssueCoding.NOT_FOUND)));
	}
}
